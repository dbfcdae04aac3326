"""HessianOperator under torch.distributed: 2 processes on gloo (CPU), compared with one process over all the data.

The global data set of 20 examples is split unevenly: rank 0 holds rows [0, 12) in batches of 8 and 4, rank 1
holds rows [12, 20) in one batch of 8, so the size weighting ``n_b / N`` with the all-reduced global ``N`` is
tested (an unweighted mean over ranks, or a per-rank ``N``, would give a different operator). One spawned run
(spawning is the slow part) saves, for each rank and each product method, the HVP of a fixed vector, the gradient,
the loss, the top-3 Lanczos eigenvalues (same seed on both ranks, so their Krylov vectors agree), a Hutchinson trace
and the all-reduced dense Hessian; the tests compare them with a single-process operator over the 20 examples, with
the dense Hessian's eigenvalues, and between the ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from flatminima.sharpness import HessianOperator, hutchinson_trace_op, lanczos_eigs
from tests._gloo import WORLD_SIZE, run_on_gloo
from tests.conftest import TEST_THREADS

N_GLOBAL = 20
SHARDS = {0: ((0, 8), (8, 12)), 1: ((12, 20),)}  # rank -> batches as row ranges of the global data
METHODS = ("double_backward", "forward_over_reverse", "auto")
K = 3
LANCZOS_TOL = 1e-10
SEED = 7
NUM_PROBES = 8
TOL = dict(rtol=1e-10, atol=1e-12)
EIG_RTOL = 1e-8

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo"
)


# ---------------------------------------------------------------------------- shared by workers and references


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1234)
    inputs = torch.randn(N_GLOBAL, 4, dtype=torch.float64, generator=gen)
    targets = torch.randint(0, 3, (N_GLOBAL,), generator=gen)
    return inputs, targets


def _loss_fn(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets)  # the mean over the batch


def _vector(dim: int) -> Tensor:
    return torch.randn(dim, generator=torch.Generator().manual_seed(99), dtype=torch.float64)


def _measure(op: HessianOperator) -> dict[str, Tensor]:
    eig = lanczos_eigs(op, k=K, tol=LANCZOS_TOL, seed=SEED, return_vectors=False)
    trace = hutchinson_trace_op(op, num_probes=NUM_PROBES, seed=SEED)
    return {
        "hvp": op.matvec(_vector(op.dim)),
        "gradient": op.gradient(),
        "loss": torch.tensor(op.loss(), dtype=torch.float64),
        "eigenvalues": eig.eigenvalues,
        "converged": torch.tensor(eig.converged),
        "eig_num_hvp": torch.tensor(eig.num_hvp),
        "trace": torch.tensor(trace.estimate, dtype=torch.float64),
        "total_count": torch.tensor(op.total_count),
        "local_count": torch.tensor(op.local_count),
        "distributed": torch.tensor(op.distributed),
    }


# ---------------------------------------------------------------------------- the distributed worker


def _measure_shard(rank: int, out_dir: Path) -> None:
    inputs, targets = _data()
    shard = [(inputs[a:b], targets[a:b]) for a, b in SHARDS[rank]]
    model = _model()
    results: dict[str, Tensor] = {}
    for method in METHODS:
        op = HessianOperator(model, _loss_fn, shard, method=method)
        for key, value in _measure(op).items():
            results[f"{method}/{key}"] = value
    results["dense_hessian"] = HessianOperator(model, _loss_fn, shard).dense_hessian()
    torch.save(results, out_dir / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Tensor]]:
    """[results of rank 0, results of rank 1]."""
    out_dir = tmp_path_factory.mktemp("hessian_dist")
    run_on_gloo(_measure_shard, out_dir)
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]


# ---------------------------------------------------------------------------- single-process reference


@pytest.fixture(scope="module")
def single() -> dict[str, Tensor]:
    """The same measures by one process over the 20 examples in one batch, plus the dense Hessian.

    A module-scoped fixture runs before conftest's per-test one sets the threads: use TEST_THREADS here too, not the
    machine's default count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TEST_THREADS)
    try:
        op = HessianOperator(_model(), _loss_fn, _data())
        assert not op.distributed
        results = _measure(op)
        results["dense_hessian"] = op.dense_hessian()
    finally:
        torch.set_num_threads(threads)
    return results


# ---------------------------------------------------------------------------- the tests


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_counts_are_global(ranks, method):
    for rank, results in enumerate(ranks):
        assert bool(results[f"{method}/distributed"])
        assert int(results[f"{method}/total_count"]) == N_GLOBAL
        assert int(results[f"{method}/local_count"]) == SHARDS[rank][-1][1] - SHARDS[rank][0][0]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("key", ["hvp", "gradient", "loss", "trace"])
def test_products_match_single_process(ranks, single, method, key):
    for rank, results in enumerate(ranks):
        torch.testing.assert_close(
            results[f"{method}/{key}"], single[key], **TOL, msg=lambda m, rank=rank: f"rank {rank}: {m}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_eigenvalues_match_single_process_and_dense(ranks, single, method):
    dense = torch.linalg.eigvalsh(single["dense_hessian"]).flip(0)[:K]  # the K largest, descending
    torch.testing.assert_close(single["eigenvalues"], dense, rtol=EIG_RTOL, atol=0)
    for rank, results in enumerate(ranks):
        assert bool(results[f"{method}/converged"]), f"rank {rank}"
        for expected in (single["eigenvalues"], dense):
            torch.testing.assert_close(
                results[f"{method}/eigenvalues"],
                expected,
                rtol=EIG_RTOL,
                atol=0,
                msg=lambda m, rank=rank: f"rank {rank}: {m}",
            )


@pytest.mark.slow
def test_dense_hessian_matches_single_process(ranks, single):
    for results in ranks:
        torch.testing.assert_close(results["dense_hessian"], single["dense_hessian"], **TOL)


@pytest.mark.slow
def test_ranks_agree_exactly(ranks):
    """Everything is all-reduced, so both ranks hold the same numbers (and Lanczos took the same path).

    Exact on any machine: the all-reduce hands both ranks the same bits (with two ranks each sum has two addends, and
    a + b == b + a in floating point), and from those identical inputs both ranks run the same code with the same
    settings (one thread each, see tests/_gloo.py)."""
    rank0, rank1 = ranks
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        if key.endswith("/local_count"):
            continue
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}")
