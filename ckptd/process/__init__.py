"""Transparent mode: process snapshots of jobs that cannot be edited, with CRIU (no torch here).

``ckptd run --transparent -- CMD`` starts CMD in a PID namespace of its own and dumps its whole process
tree with ``criu dump --leave-running`` into the local tier, as snapshots of kind ``process`` that commit,
upload and age like the hook's. A job that dies is restored from its newest image; ``ckptd pause`` dumps a
job and stops it.

    criu.py         finding and checking CRIU, running dump and restore with one-line errors
    gpu.py          what a CUDA job needs: cuda-checkpoint, a recent driver, CRIU's CUDA plugin
    probe.py        the job's process tree from /proc: its TCP connections, its GPU use
    launch.py       the launcher: a new PID namespace and session, then exec (run as a script)
    stdio.py        the job's stdout/stderr: pipes pumped into ``ckptd run``'s own
    job.py          the job's processes: launched or restored, waited for, stopped
    image.py        a dump as a snapshot: manifest of kind "process" and the gate that reads it back
    dumper.py       images of the running job into the tiers, and what they cost the job
    control.py      running transparent jobs by id, and ``ckptd pause``
    transparent.py  the run loop: launch or restore, dump on the policy, restore after a death
"""
