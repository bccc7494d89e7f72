"""A user model for the jobs tests (``--model tests/jobs/gated_model.py:velocity``): the bundled
Fashion-MNIST flow, unchanged in value, that blocks while the file named by
``$DFLOW_FAST_TEST_GATE`` exists, so a test can stop a job mid-run at a point it chooses and kill
it there; with ``$DFLOW_FAST_TEST_EXIT_AFTER`` = N its process dies (``os._exit``, no clean-up,
as under SIGKILL) at its N-th evaluation, so a test can lose one worker of a job."""
import os
import time

from dflow_fast.models import load_pretrained


def velocity(device, dtype):
    flow = load_pretrained("fashion-mnist", device=device, dtype=dtype)
    gate = os.environ.get("DFLOW_FAST_TEST_GATE")
    exit_after = int(os.environ.get("DFLOW_FAST_TEST_EXIT_AFTER", 0))
    calls = [0]

    def v(t, x):
        calls[0] += 1
        if calls[0] == exit_after:
            os._exit(3)
        while gate and os.path.exists(gate):
            time.sleep(0.01)
        return flow(t, x)
    v.sample_shape = (1, 28, 28)
    return v
