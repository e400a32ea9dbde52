"""Accuracy-aware fallback: keep the MatMuls that hurt accuracy most in FP32, one at a time,
until INT8 is within a bound of FP32 on held-out passages."""
import logging

from . import benchmark

log = logging.getLogger(__name__)


def _accuracy_and_logits(graph, batches, desc):
    logits, token_hits, _ = benchmark.evaluate(graph.serving_fn(), batches, desc)
    return float(token_hits.mean()) * 100, logits


def choose_fp32_sites(graph, sites, quantize, batches, max_drop):
    """The sites to leave in FP32 so that the last-token accuracy drop on `batches` is at most
    `max_drop` points. `quantize(graph, sites)` returns a copy of `graph` with `sites` quantized.

    Harm is measured per site, quantizing it alone, as the KL divergence of the next-token
    distribution from FP32's (finer than accuracy on a few hundred passages)."""
    fp32_acc, fp32_logits = _accuracy_and_logits(graph, batches, "fallback: FP32")
    int8_acc, _ = _accuracy_and_logits(quantize(graph, sites), batches, "fallback: INT8")
    log.info("held-out accuracy: FP32 %.2f%%, INT8 %.2f%% (bound: drop <= %.2f)", fp32_acc, int8_acc, max_drop)
    if fp32_acc - int8_acc <= max_drop:
        return []
    harm = {}
    for site in sites:
        _, logits = _accuracy_and_logits(quantize(graph, [site]), batches, f"fallback: {site.matmul[-40:]}")
        harm[site.matmul] = benchmark.mean_kl_divergence(fp32_logits, logits)
    order = sorted(sites, key=lambda s: -harm[s.matmul])
    kept = []
    for site in order:
        kept.append(site)
        remaining = [s for s in sites if s.matmul not in {k.matmul for k in kept}]
        acc, _ = _accuracy_and_logits(quantize(graph, remaining), batches, "fallback: check")
        log.info("FP32 for %s (KL %.2e): INT8 accuracy %.2f%%", site.matmul, harm[site.matmul], acc)
        if fp32_acc - acc <= max_drop:
            break
    else:
        log.warning("the drop stays above %.2f points even with every MatMul in FP32", max_drop)
    return kept
