"""merge_tensors / merge_state_dicts (stub; being written)."""
MERGE_METHODS = ()


def merge_tensors(method, base, tensors, weights=None, density=1.0, gamma=0.01, epsilon=0.15,
                  lambda_=1.0, normalize=None, rescale=None, seed=None, backend=None, **kw):
    raise NotImplementedError


def merge_state_dicts(method, base, finetuned, weights=None, alpha=1.0, **kw):
    raise NotImplementedError
