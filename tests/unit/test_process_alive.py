"""process_alive: what tests and the MPS supervision call dead is what a parent can reap."""

import subprocess
import sys

import psutil
from support import wait_for

from gpu_orchestrator.supervisor.mps import process_alive

# The main thread ends with pthread_exit while another thread runs on: the leader shows as a
# zombie, yet the process lives (as a killed multi-threaded loader does for a moment).
MAIN_THREAD_GONE = """
import ctypes, sys, threading, time
threading.Thread(target=time.sleep, args=(60,)).start()
print("started", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_a_zombie_main_thread_with_a_live_thread_is_alive_until_reaped():
    proc = subprocess.Popen([sys.executable, "-c", MAIN_THREAD_GONE], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "started"
        wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, what="the main thread gone")
        assert process_alive(proc.pid)
        assert proc.poll() is None  # and indeed its parent cannot reap it yet
    finally:
        proc.kill()
        proc.wait(30)
    assert not process_alive(proc.pid)


def test_an_unreaped_zombie_is_dead():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_for(lambda: psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE, what="a zombie")
    try:
        assert not process_alive(proc.pid)
    finally:
        proc.wait(30)
