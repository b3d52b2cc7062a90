"""Peak memory of gradcov on the paper-sized tied embedding (V = 32768, d = 512), a few examples, CPU.

The tied weight's V-side factor is diagonal, so its eigenbasis is a permutation; it used to be densified
(``V × V``: 8.6 GB in float64). ``python -m benchmarks.gradcov_memory`` builds the paper's shallow
Transformer (d_model 512, d_ff 2048, 8 heads, 2 layers, sequence 64, vocabulary 32768) in float64,
captures Monte-Carlo factors on 4 random sequences, and runs the all-direction projection of the tied
layer (``mc`` route, 4 samples, Rao-Blackwellised) on them, recording the process's peak resident memory
(``ru_maxrss``) before and after, into ``benchmarks/results/gradcov_memory.json``.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main(examples: int = 4) -> dict:
    from curvlab.analysis.gradcov import LayerBasis, project_gradients
    from curvlab.capture.factors import collect_factors
    from curvlab.models.transformer import TransformerShallow

    vocab, d, seq = 32768, 512, 64
    torch.manual_seed(0)
    model = TransformerShallow(vocab, d_model=d, d_ff=2048, heads=8, layers=2, seq_len=seq).double().eval()
    x = torch.randint(0, vocab, (examples, seq))
    y = torch.randint(0, vocab, (examples, seq))
    factors = collect_factors(model, [(x, y)], fisher="mc", mc_samples=1)
    tied = factors["pre_softmax"]
    before = _peak_mb()
    start = time.perf_counter()
    basis = LayerBasis.from_factors(tied.S, tied.A)
    stats = project_gradients(model, [(x, y)], {"pre_softmax": basis}, curvature="mc", mc_samples=4)
    seconds = time.perf_counter() - start
    after = _peak_mb()
    s = stats["pre_softmax"]
    result = {
        "what": "gradcov of the tied embedding, V = 32768, d = 512, float64, mc route (4 samples), CPU",
        "examples": examples, "sequence": seq, "shape": list(s.curvature.shape),
        "peak_rss_mb_before_projection": round(before, 1), "peak_rss_mb_after": round(after, 1),
        "seconds": round(seconds, 1),
        "dense_Q_S_would_need_mb": round(vocab * vocab * 8 / 2**20, 1),
        "estimator": s.estimator,
        "torch": torch.__version__,
    }
    out = Path(__file__).parent / "results" / "gradcov_memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    print(json.dumps(main()))
