"""Beam search, step for step as transformers' ``_beam_search`` (transformers >= 4.50, vectorised).

Per prompt, ``num_beams`` running beams and ``num_beams`` finished hypotheses are
kept in static tensors. Each step:

1. scores = log_softmax(float32 logits), then the logits processors (the same
   as greedy decoding; with ``do_sample`` also the warpers), plus each beam's
   running score;
2. the top K = max(2, 1 + #stop tokens) * num_beams continuations over all
   beams (sampled without replacement with ``do_sample``);
3. those that end (a stop token, a stop string, or the length limit) leave the
   running set; the best ``num_beams`` others continue;
4. ending candidates among the first ``num_beams`` enter the finished set with
   score ``sum log p / generated_length ** length_penalty`` (the generated
   length counts the stop token, not the prompt), if they beat the worst kept;
5. stop when no running beam can beat the worst finished one (the heuristic
   that ``early_stopping`` selects: False bounds by the current length,
   "never" with a positive length penalty by the maximum length), when every
   prompt has ``num_beams`` finished hypotheses and ``early_stopping=True``,
   or when every candidate ended.
"""

from __future__ import annotations

import torch

from .generation import GenerationConfig, make_generator, process_logits, warp

_NEG = -1.0e9  # transformers' "impossible" score


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) rows ``index`` (B, J) along dim 1 -> (B, J, ...)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def _fill_value(cfg: GenerationConfig) -> int:
    """What follows a hypothesis that ended early: transformers writes ``pad_token_id or eos[0]`` (so a pad
    id of 0 becomes the first stop token), or -1 without stop tokens; qkv writes the pad id (or 0) there."""
    eos = cfg.stop_ids
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (eos[0] if eos else None)
    if eos:
        return pad or eos[0]
    return pad if pad is not None else 0


class _Beams:
    """The per-prompt state: running beams and finished hypotheses, (B, num_beams, ...) each."""

    def __init__(self, B: int, nb: int, n: int, fill: int, device):
        self.running = torch.full((B, nb, n), fill, dtype=torch.long, device=device)  # new tokens
        self.running_scores = torch.zeros(B, nb, device=device)
        self.running_scores[:, 1:] = _NEG  # step 1 expands the first beam only (the others are copies)
        self.running_rows = torch.zeros(B, nb, dtype=torch.long, device=device)  # flat cache row of each beam
        self.done = self.running.clone()
        self.done_scores = torch.full((B, nb), _NEG, device=device)
        self.done_lengths = torch.zeros(B, nb, dtype=torch.long, device=device)
        self.finished = torch.zeros(B, nb, dtype=torch.bool, device=device)
        self.open = torch.ones(B, 1, dtype=torch.bool, device=device)  # the early-stop heuristic unsatisfied


def _candidates(scores: torch.Tensor, k: int, cfg: GenerationConfig, generator):
    """Best (or sampled) k of scores (B, nb * V): their scores and flat indices, best first."""
    if cfg.do_sample:
        idx = torch.multinomial(scores.softmax(-1), num_samples=k, generator=generator)
        top = scores.gather(1, idx)
        top, order = top.sort(dim=-1, descending=True)
        return top, idx.gather(1, order)
    return scores.topk(k)


def _finish(st: _Beams, cand_seq, cand_scores, hits, i: int, cfg: GenerationConfig, nb: int) -> None:
    """Step 4: candidates that ended, among the first ``nb``, join the finished hypotheses if better."""
    K = cand_scores.shape[1]
    top_nb = torch.arange(K, device=hits.device) < nb
    just = hits & top_nb[None, :]
    s = cand_scores / ((i + 1) ** cfg.length_penalty)
    full = st.finished.all(-1, keepdim=True) & (cfg.early_stopping is True)
    s = s + full.float() * _NEG + (~st.open).float() * _NEG + (~just).float() * _NEG
    merged_scores = torch.cat([st.done_scores, s], dim=1)
    keep = merged_scores.topk(nb)[1]
    st.done = _gather(torch.cat([st.done, cand_seq], dim=1), keep)
    st.done_scores = _gather(merged_scores, keep)
    lengths = torch.full_like(hits, i + 1, dtype=torch.long)
    st.done_lengths = _gather(torch.cat([st.done_lengths, lengths], dim=1), keep)
    st.finished = _gather(torch.cat([st.finished, just], dim=1), keep)


def _still_open(st: _Beams, i: int, cfg: GenerationConfig) -> torch.Tensor:
    """Step 5's heuristic: can a running beam still beat the worst finished hypothesis? (B, 1)."""
    if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
        best_len = cfg.max_new_tokens
    else:
        best_len = i + 1
    best_running = st.running_scores[:, :1] / (best_len**cfg.length_penalty)
    worst_done = torch.where(st.finished, st.done_scores.min(dim=1, keepdim=True)[0], _NEG)
    return st.open & (best_running > worst_done).any(dim=-1, keepdim=True)


def _history(session, st: _Beams, i: int) -> torch.Tensor:
    B, nb = st.running.shape[:2]
    return torch.cat([session.history, st.running[:, :, :i].reshape(B * nb, i)], dim=1)


def beam_search(session, cfg: GenerationConfig, watch_factory=None) -> torch.Tensor:
    """Beam search over a `qkv.models.decoding.Session` whose rows are each prompt's beams (prompt-major).

    Returns the new tokens (B * num_return_sequences, n) of the best hypotheses, best first per prompt,
    cut to the longest; shorter ones are followed by the fill value (see `_fill_value`).
    """
    N, V = session.logits.shape
    nb, n = cfg.num_beams, cfg.max_new_tokens
    B, device = N // nb, session.logits.device
    if n == 0:
        return torch.empty(B * cfg.num_return_sequences, 0, dtype=torch.long, device=device)
    eos = torch.tensor(cfg.stop_ids, dtype=torch.long, device=device)
    K = max(2, 1 + eos.numel()) * nb
    st = _Beams(B, nb, n, _fill_value(cfg), device)
    generator = make_generator(cfg, device)
    P = session.history.shape[1]
    offset = torch.arange(B, device=device).view(-1, 1) * nb
    logits = session.logits
    for i in range(n):
        scores = logits.float().log_softmax(-1)
        hist = _history(session, st, i) if cfg.uses_history else None
        scores = process_logits(scores, cfg, hist, first=i == 0, prompt_len=P)
        if cfg.do_sample:
            scores = warp(scores, cfg, min_tokens_to_keep=max(2, eos.numel() + 1) if eos.numel() else 2)
        scores = (scores.view(B, nb, V) + st.running_scores[:, :, None]).view(B, nb * V)
        cand_scores, flat = _candidates(scores, K, cfg, generator)
        beam, tok = flat // V, flat % V  # (B, K)
        cand_seq = _gather(st.running, beam)
        cand_seq[:, :, i] = tok
        hits = torch.isin(tok, eos) if eos.numel() else torch.zeros_like(tok, dtype=torch.bool)
        if i + 1 >= n:
            hits = torch.ones_like(hits)
        if cfg.stop and watch_factory is not None:
            hits |= _stop_strings(cand_seq[:, :, : i + 1], cfg, watch_factory)
        cand_rows = beam + offset
        # step 3: the best nb candidates that did not end keep running
        running_scores = cand_scores + hits.float() * _NEG
        nxt = running_scores.topk(nb)[1]
        st.running, st.running_scores = _gather(cand_seq, nxt), _gather(running_scores, nxt)
        st.running_rows = _gather(cand_rows, nxt)
        _finish(st, cand_seq, cand_scores, hits, i, cfg, nb)
        session.reorder(st.running_rows.reshape(-1))
        st.open = _still_open(st, i, cfg)
        go = bool(st.open.any()) and not (bool(st.finished.all()) and cfg.early_stopping is True) \
            and not bool(hits.all())
        if not go:
            break
        logits = session.step(st.running[:, :, i].reshape(-1))
    r = cfg.num_return_sequences
    out = st.done[:, :r].reshape(B * r, n)
    return out[:, : int(st.done_lengths[:, :r].max())]


def _stop_strings(seqs: torch.Tensor, cfg: GenerationConfig, watch_factory) -> torch.Tensor:
    """(B, K, L) candidate token rows -> (B, K) bool: the decoded text holds a stop string."""
    B, K, L = seqs.shape
    watch = watch_factory(B * K)
    stops = set(cfg.stop_ids)
    hit = []
    for row, stream in zip(seqs.reshape(B * K, L).tolist(), watch.streams):
        for t in row:
            if t in stops:
                break
            stream.push(t)
        hit.append(stream.stopped)
    return torch.tensor(hit, device=seqs.device).view(B, K)
