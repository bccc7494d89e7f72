"""A user model for the jobs tests (``--model tests/jobs/gated_model.py:velocity``): the bundled
Fashion-MNIST flow, unchanged in value, that blocks while the file named by
``$DFLOW_FAST_TEST_GATE`` exists, so a test can stop a job mid-run at a point it chooses and kill
it there."""
import os
import time

from dflow_fast.models import load_pretrained


def velocity(device, dtype):
    flow = load_pretrained("fashion-mnist", device=device, dtype=dtype)
    gate = os.environ.get("DFLOW_FAST_TEST_GATE")

    def v(t, x):
        while gate and os.path.exists(gate):
            time.sleep(0.01)
        return flow(t, x)
    v.sample_shape = (1, 28, 28)
    return v
