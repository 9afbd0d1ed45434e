import torch

from lowbit.calibration.sampling import self_generated_windows

from ..conftest import make_model


def test_self_generated_windows_are_reproducible_and_leave_the_rng_alone(tiny_tokenizer):
    model = make_model(len(tiny_tokenizer))
    state = torch.random.get_rng_state()
    a = self_generated_windows(model, nsamples=3, seqlen=12, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = self_generated_windows(model, nsamples=3, seqlen=12, seed=1)
    c = self_generated_windows(model, nsamples=3, seqlen=12, seed=2)
    assert a.shape == (3, 12) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.max()) < len(tiny_tokenizer)
