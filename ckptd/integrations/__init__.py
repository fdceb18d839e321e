"""Callbacks that put ckptd under the training frameworks users already have.

``ckptd.integrations.lightning.CkptdCallback`` (PyTorch Lightning 2.6, either
``pytorch_lightning`` or ``lightning``) and
``ckptd.integrations.transformers.CkptdCallback`` (the Hugging Face Trainer).
Each snapshots through a :class:`ckptd.Checkpointer` and offers ``resume_path()``,
the value the framework's own resume argument takes. Neither module is imported
by ``import ckptd``; each needs its framework installed (``ckptd[lightning]``,
``ckptd[transformers]``).
"""
