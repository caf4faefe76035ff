"""Property test: random override values are either accepted and run, or rejected at once with a short
message naming the field — never a traceback from deep inside torch."""
import tempfile
from pathlib import Path

from hydra.errors import ConfigCompositionException, HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bertexp.errors import BertexpError
from conftest import run_in_process

TEXT = st.sampled_from(["abc", "null", "[1,2]", "true", "1e-3", "-0", "nan", "inf"])
FIELDS = {
    "masking.ratio": st.floats(-0.5, 1.5) | TEXT,
    "masking.mask_token_prob": st.floats(-0.5, 1.5) | TEXT,
    "masking.random_token_prob": st.floats(-0.5, 1.5) | TEXT,
    "data.max_length": st.integers(-10, 700) | TEXT,
    "data.batch_size": st.integers(-3, 48) | TEXT,
    "data.val_fraction": st.floats(-0.5, 1.0) | TEXT,
    "optim.lr": st.floats(-1.0, 0.1) | TEXT,
    "optim.warmup_steps": st.integers(-5, 5) | TEXT,
    "trainer.max_steps": st.integers(-2, 2) | TEXT,
    "trainer.exam_pairs": st.integers(-2, 40) | TEXT,
    "trainer.exam_length": st.integers(-10, 700) | TEXT,
    "optim.grad_clip": st.floats(-1.0, 2.0) | TEXT,
    "objective.nsp_weight": st.floats(-1.0, 2.0) | TEXT,
}


def _fmt(v):
    return repr(float(v)) if isinstance(v, float) else str(v)


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(sorted(FIELDS)), st.none(), min_size=1, max_size=3).flatmap(
    lambda d: st.fixed_dictionaries({k: FIELDS[k] for k in d})))
def test_random_overrides_run_or_fail_with_one_line(overrides):
    args = [f"{k}={_fmt(v)}" for k, v in overrides.items()]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            final = run_in_process(Path(tmp), ["trainer.exam_pairs=8", *args, "logger=none"])
        except BertexpError as e:
            msg = str(e)
            assert "\n" not in msg and len(msg) < 300, msg
            assert any(k.split(".")[-1] in msg for k in overrides), f"{args}: message names no field: {msg}"
            return
        except (ConfigCompositionException, HydraException) as e:
            # Hydra's own composition message: type errors and the like, naming the key
            assert any(k in str(e) or k in str(e.__cause__) for k in overrides), f"{args}: {e}"
            return
    assert final["final/step"] >= 1  # accepted: it really ran
