"""Per-sample gradients and their norms, from the δ and a our rules already hold.

The notes' weight gradient is a sum over the batch, ∂J/∂W = Σₙ δₙ aₙᵀ. Sample n's own
gradient is the one term δₙ aₙᵀ (Σₜ δₙₜ aₙₜᵀ over a sequence), and its norm needs no
matrix at all:

    ‖δₙ aₙᵀ‖² = ‖δₙ‖² ‖aₙ‖²                       one position per sample
    ‖Σₜ δₙₜ aₙₜᵀ‖² = ⟨δₙ δₙᵀ, aₙ aₙᵀ⟩               T positions: two T×T Gram matrices
    ‖Σₜ onehot(xₙₜ) δₙₜᵀ‖² = Σ_{t,t'} [xₙₜ = xₙₜ'] δₙₜ·δₙₜ'     an embedding

    with manual_backprop.per_sample_grads(model) as ps:
        loss_fn(model(x), y).backward()
    p.grad_sample     # (N, *p.shape) for every parameter of a module on our rules
    ps.norms          # (N,): each sample's gradient norm over all of them

Each rule's backward hands δ and a to `observe`; this module is one observer. The math
(per-sample gradient, per-sample squared norm) lives beside each rule.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from manual_backprop import observe
from manual_backprop._checks import InputError

__all__ = ["per_sample_grads"]


def _index_in(p: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """The flat indices into p (contiguous) of the elements `view` (a view of p) covers, in view's shape."""
    if not p.is_contiguous():
        raise InputError("per_sample_grads: a view of a non-contiguous parameter cannot be mapped back to it")
    index = torch.arange(p.numel(), device=p.device).view(p.shape)
    return index.as_strided(view.shape, view.stride(), view.storage_offset() - p.storage_offset())


def _is_whole(p: torch.Tensor, view: torch.Tensor) -> bool:
    return view is p or (view.shape == p.shape and view.stride() == p.stride()
                         and view.storage_offset() == p.storage_offset())


def _sq(g: torch.Tensor) -> torch.Tensor:
    """(N,) squared L2 norms of the per-sample slices of g (no squared copy of g formed)."""
    return torch.linalg.vector_norm(g.flatten(1), dim=1).square()


def _add_into(current: dict, p: torch.Tensor, view: torch.Tensor, grad: torch.Tensor) -> None:
    """current[p] += per-sample gradients (N, *view.shape) of a view of p, laid into (N, *p.shape)."""
    N = grad.shape[0]
    if _is_whole(p, view):
        grad = grad.reshape(N, *p.shape)
        current[p] = grad if p not in current else current[p] + grad
        return
    if p not in current:
        current[p] = grad.new_zeros(N, *p.shape)
    current[p].view(N, -1).index_add_(1, _index_in(p, view).reshape(-1), grad.reshape(N, -1))


def _add_to_sum(out: dict, p: torch.Tensor, view: torch.Tensor, g: torch.Tensor) -> None:
    """out[p] += g, the summed gradient of a view of p (a fresh tensor: the first one for p is kept as it is)."""
    if p not in out and _is_whole(p, view):  # no zeros to add it to
        out[p] = g.to(p.dtype).reshape(p.shape)
        return
    total = out.setdefault(p, torch.zeros_like(p))
    if _is_whole(p, view):
        total += g.to(p.dtype).reshape(p.shape)
    else:
        total.view(-1).index_add_(0, _index_in(p, view).reshape(-1), g.to(p.dtype).reshape(-1))


class _Step:
    """One forward (and the backward that follows): which parameters its rules used, and what came back."""

    def __init__(self) -> None:
        self.uses: dict = {}  # parameter -> [views kept in forward]
        self.seen: dict = {}  # parameter -> how many of its uses backward has reported
        self.current: dict = {}  # parameter -> (N, *p.shape) summed over its uses so far
        self.overlapping: dict = {}  # parameter -> whether two of its uses cover one element (tied weights)
        self.sq: torch.Tensor | None = None  # (N,) squared norms so far
        self.samples: int | None = None  # N: the model's first input along the batch dim, else the first δ's

    def add_sq(self, sq: torch.Tensor) -> None:
        self.sq = sq if self.sq is None else self.sq + sq

    def overlaps(self, p: torch.Tensor) -> bool:
        """Whether the uses of p in this forward touch one element twice (then their per-sample gradients
        must be summed before the norm, not their squared norms)."""
        if p not in self.overlapping:
            views = self.uses.get(p, [])
            if len(views) <= 1:
                self.overlapping[p] = False
            elif any(_is_whole(p, v) for v in views):
                self.overlapping[p] = True
            else:
                count = torch.zeros(p.numel(), device=p.device)
                for v in views:
                    count.index_add_(0, _index_in(p, v).reshape(-1), torch.ones(v.numel(), device=p.device))
                self.overlapping[p] = bool(count.max() > 1)  # once per parameter per step, not per element
        return self.overlapping[p]


class per_sample_grads:
    """Context manager: per-sample gradients (`p.grad_sample`) and norms (`ps.norms`) of `model`'s parameters.

    model:           any module whose parametric modules run our rules (manual_backprop.nn, convert, MLP).
    loss_reduction:  "mean" if the loss averages over the batch (its 1/N is undone, as Opacus does:
                     `p.grad_sample[n]` is the gradient of sample n's own loss), "sum" otherwise.
    materialize:     True: set `p.grad_sample` (N, *p.shape). False: only `ps.norms`, from the rules'
                     norm identities, forming no (N, *p.shape) tensor (except for a parameter two uses
                     of which overlap in one forward, a tied weight, whose per-sample sum must be formed,
                     and for a rule whose per-sample gradients are no larger than its δ and a, such as a
                     convolution over many positions or a normalisation's γ, β: those are formed once
                     and kept in place of δ and a); each rule's δ and a are kept (until the context
                     object goes) so that `weighted_sum` / `privacy.clip_and_noise_` can reweight them.
    strict:          a parameter of a module left on stock autograd raises an error naming it; with
                     strict=False it is skipped and listed in `ps.skipped`.
    batch_first:     samples along dim 0 of the model's data; False for sequence-first (L, N, E) data.
    bookkeeping:     for a private step (needs materialize=False). True: backward forms no batch-summed
                     gradient for the parameters on our rules, so `p.grad` is left as it was (None after
                     `zero_grad()`); `privacy.clip_and_noise_` then writes it, the clipped sum Σₙ cₙ gₙ
                     formed once per rule from the kept δ and a (one weight-gradient product of the
                     reweighted δ). Read `.grad` only after `clip_and_noise_` (or take `weighted_sum` of
                     ones for the unclipped sum). False (the default): `p.grad` accumulates the unclipped
                     gradient as in any backward, for readers of `.grad` who do not clip.

    N is the size of the batch dimension; dimensions after it (sequence positions) are summed inside
    each sample. `p.grad` accumulates as usual (unless `bookkeeping`). A parameter used twice in one forward gets the sum of
    its per-sample contributions. A second forward/backward inside one context does what Opacus does:
    `p.grad_sample` becomes a list, one (N, *p.shape) tensor per backward, and `ps.norms` grows by the
    second batch's norms (DPOptimizer concatenates the list as more samples). Entering the context
    clears `grad_sample` from the model's parameters; the attribute stays after exit for the reader.
    BatchNorm in training mode mixes samples: it raises an InputError naming the module.
    """

    keep_output = False

    def __init__(self, model: torch.nn.Module, loss_reduction: str = "mean", materialize: bool = True,
                 strict: bool = True, batch_first: bool = True, bookkeeping: bool = False) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise InputError(f'per_sample_grads: loss_reduction must be "mean" or "sum", got {loss_reduction!r}')
        if bookkeeping and materialize:
            raise InputError("per_sample_grads: bookkeeping=True keeps δ and a instead of per-sample gradients: "
                             "pass materialize=False with it")
        self.model, self.loss_reduction, self.materialize, self.strict = model, loss_reduction, materialize, strict
        self.bookkeeping = bookkeeping
        self._batch_dim = 0 if batch_first else 1
        self._watch = observe.watch(model, self, batch_dim=self._batch_dim)
        self._names = {p: n for n, p in model.named_parameters(remove_duplicate=False)}
        self.skipped: list[str] = []
        self._steps: list[_Step] = []
        self._step_of: dict = {}  # id(call) -> its step
        self._handles: list = []
        self._ran: list = []
        self._kept: list = []  # materialize=False: (step, seen, sources, δ, a, scale) for `privacy.clip_and_noise_`
        self._kept_grads: list = []  # materialize=False, where smaller than δ and a: (step, source, (N, *view))

    # ---------------------------------------------------------------- the context

    def __enter__(self) -> "per_sample_grads":
        for p in self.model.parameters():
            p.grad_sample = None
        self._watch.__enter__()
        self._handles.append(self.model.register_forward_pre_hook(self._begin))
        self._handles.append(self.model.register_forward_hook(self._check_coverage))
        for module in self.model.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                self._handles.append(module.register_forward_pre_hook(lambda m, args: self._ran.append(m)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._watch.__exit__(*exc)

    @property
    def norms(self) -> torch.Tensor:
        """(N,) per-sample gradient L2 norms over every parameter on our rules (concatenated over the
        backward passes made inside the context, like `grad_sample` lists)."""
        sq = [s.sq for s in self._steps if s.sq is not None]
        if not sq:
            raise InputError("per_sample_grads: no per-sample gradient yet: run forward and backward inside the context")
        return torch.cat(sq).sqrt()

    def parameters(self) -> list:
        """The parameters that got per-sample gradients (or norms), in the model's order."""
        got = {s[1] for *_, sources, _d, _a, _s in self._kept for s in sources if s is not None}
        got |= {source[1] for _, source, _ in self._kept_grads}
        return [p for p in dict.fromkeys(self._names) if p.requires_grad and (
            getattr(p, "grad_sample", None) is not None or p in got)]

    def weighted_sum(self, weights: torch.Tensor) -> dict:
        """{p: Σₙ wₙ gₙ} over every sample of every backward in the context (`norms`' order), where gₙ is
        sample n's gradient of p; without forming any gₙ when materialize=False: each rule's own summed
        gradient of the reweighted δ, Σₙ wₙ δₙ aₙᵀ (its backward's pure function, `Seen.grads`), or, for a
        rule whose per-sample gradients were no larger than its δ and a and so were kept instead (a convolution
        over many positions), Σₙ wₙ gₙ of those."""
        if self.materialize:
            out = {}
            for p in self.parameters():
                g = torch.cat(p.grad_sample) if isinstance(p.grad_sample, list) else p.grad_sample
                out[p] = torch.tensordot(weights.to(g.dtype), g, dims=1)
            return out
        offsets, start = {}, 0
        for step in self._steps:
            if step.sq is not None:
                offsets[step], start = start, start + step.sq.shape[0]
        out: dict = {}
        for step, seen, sources, delta, a, scale in self._kept:
            w = weights[offsets[step]: offsets[step] + delta.shape[0]].to(delta.dtype) * scale
            grads = seen.summed(delta * w.view(-1, *[1] * (delta.dim() - 1)), a)
            for source, g in zip(sources, grads):
                if source is not None and g is not None:
                    _add_to_sum(out, source[1], source[2], g)
        for step, (_, p, view), g in self._kept_grads:
            w = weights[offsets[step]: offsets[step] + g.shape[0]].to(g.dtype)
            _add_to_sum(out, p, view, torch.tensordot(w, g, dims=1))
        return out

    # ---------------------------------------------------------------- forward: what each step uses

    def _begin(self, module, args) -> None:
        self._steps.append(_Step())
        self._ran.clear()
        first = next((x for x in args if isinstance(x, torch.Tensor)), None)
        if first is not None and first.dim() > self._batch_dim:
            self._steps[-1].samples = first.shape[self._batch_dim]

    def _step(self) -> _Step:
        if not self._steps:
            self._steps.append(_Step())
        return self._steps[-1]

    def keeps(self, call: observe.Call, params: tuple) -> list | None:
        """A rule kept `params` in forward: count each parameter's uses (views of one, too). Book-keeping:
        which of them `weighted_sum` forms the gradient of (from δ and a), so that the rule's backward need not."""
        step = self._step()
        self._step_of[id(call)] = step
        formed = []
        for tensor in params:
            source = call.source(tensor)
            ours = source is not None and source[1].requires_grad
            if ours:
                step.uses.setdefault(source[1], []).append(source[2])
            formed.append(ours)
        return formed if self.bookkeeping else None

    def _check_coverage(self, module, args, output) -> None:
        """After the model's forward: every parameter of a module that ran should have been kept by a rule."""
        if not torch.is_grad_enabled():  # an evaluation forward: rules keep nothing, no gradient follows
            return
        step = self._step()
        stock = []
        for m in dict.fromkeys(self._ran):
            for p in m.parameters(recurse=False):
                if p.requires_grad and p not in step.uses and p not in self._skipped_params():
                    stock.append(f"{self._names.get(p, '?')} ({type(m).__name__})")
        if stock and self.strict:
            raise InputError(
                "per_sample_grads: these parameters belong to modules on stock autograd, which give no per-sample "
                f"gradients: {', '.join(stock)}. Convert the model (manual_backprop.convert) or pass strict=False "
                "to skip them (listed in ps.skipped)"
            )
        self.skipped.extend(s for s in stock if s not in self.skipped)

    def _skipped_params(self) -> set:
        return {p for p, n in self._names.items() if any(s.startswith(n + " (") for s in self.skipped)}

    # ---------------------------------------------------------------- backward: what each rule saw

    def see(self, seen: observe.Seen) -> None:
        step = self._step_of.get(id(seen.call)) or self._step()
        sources = [seen.call.source(t) for t in seen.params]
        sources = [s if s is not None and s[1].requires_grad else None for s in sources]
        if all(s is None for s in sources):
            return
        delta, a = seen.samples_first()
        if step.samples is None:
            step.samples = delta.shape[0]
        elif delta.shape[0] != step.samples:  # a parameter applied to no sample: broadcast over the batch
            name = seen.name or type(seen.call.module).__name__
            raise InputError(
                f"per_sample_grads: {name} ({type(seen.call.module).__name__}) ran on an input with "
                f"{delta.shape[0]} along the batch dimension, not the batch's {step.samples} samples: its output is "
                "shared by every sample (broadcast over the batch, as position embeddings of positions (1, T) or "
                "T5's relative position bias), so δ reaches it already summed over the samples and no rule can "
                "split it. Freeze it (requires_grad_(False)), or keep it stock (convert(..., exclude=[name])) "
                "and pass strict=False"
            )
        if delta.is_floating_point() and delta.dtype in (torch.float16, torch.bfloat16):
            delta = delta.float()  # per-sample sums in fp32 under autocast (the parameters' dtype)
        if a.is_floating_point() and a.dtype in (torch.float16, torch.bfloat16):
            a = a.float()
        N = delta.shape[0]
        scale = N if self.loss_reduction == "mean" else 1  # δ carries the mean's 1/N: undo it
        if not self.materialize:  # kept for a reweighted sum Σₙ cₙ gₙ once the norms are known
            # detached: a kept `a` with a grad_fn would hold the graph, whose nodes hold their call and so
            # this context, a cycle through autograd's C++ nodes that Python's collector cannot free
            delta, a = delta.detach(), a.detach()
            keep_grads = self._keeps_grads(step, sources, delta, a)
            if not keep_grads:
                kept = replace(seen, delta=seen.delta.detach(), input=seen.input.detach(), output=None)
                self._kept.append((step, kept, sources, delta, a, scale))
        try:
            if not self.materialize and keep_grads:
                grads = seen.per_sample(delta * scale if scale != 1 else delta, a)
                for source, g in zip(sources, grads):
                    if source is not None and g is not None:
                        g = g.to(source[1].dtype)
                        step.add_sq(_sq(g))
                        self._count(step, source[1])
                        self._kept_grads.append((step, source, g))
            elif self.materialize or any(s is not None and step.overlaps(s[1]) for s in sources):
                # every rule's gradient is linear in δ: undo the 1/N on δ, not on the larger gradients
                grads = seen.per_sample(delta * scale if scale != 1 else delta, a)
                for source, g in zip(sources, grads):
                    if source is None or g is None:
                        continue
                    p, view = source[1], source[2]
                    if not self.materialize and not step.overlaps(p):
                        step.add_sq(_sq(g))
                        self._count(step, p)
                        continue
                    _add_into(step.current, p, view, g.to(p.dtype))
                    self._count(step, p)
            else:
                step.add_sq(seen.sq_norms(delta, a) * scale**2)
                for source in sources:
                    if source is not None:
                        self._count(step, source[1])
        except observe.MixesSamples as error:
            raise InputError(f"per_sample_grads: {seen.name or type(seen.call.module).__name__} "
                             f"({type(seen.call.module).__name__}): {error}") from None

    @staticmethod
    def _keeps_grads(step: _Step, sources: list, delta: torch.Tensor, a: torch.Tensor) -> bool:
        """materialize=False: whether to keep a rule's per-sample gradients instead of its δ and a, because they
        are no larger (a convolution over many positions, whose norm identity would form them anyway). Their
        norms are then read off them and the clipped sum Σₙ cₙ gₙ is a weighted sum of them, where reweighting
        δ would cost one more weight-gradient product. Never for a parameter two uses of which overlap."""
        used = [s for s in sources if s is not None]
        size = delta.shape[0] * sum(s[2].numel() for s in used)
        return size <= delta.numel() + a.numel() and not any(step.overlaps(s[1]) for s in used)

    def _count(self, step: _Step, p: torch.Tensor) -> None:
        """One more use of p reported; after its last use in this step, promote its per-sample sum."""
        step.seen[p] = step.seen.get(p, 0) + 1
        if step.seen[p] < len(step.uses.get(p, [None])) or p not in step.current:
            return
        g = step.current.pop(p)
        step.add_sq(_sq(g))
        if self.materialize:  # as Opacus's promote_current_grad_sample: a second backward makes a list
            if p.grad_sample is None:
                p.grad_sample = g
            elif isinstance(p.grad_sample, list):
                p.grad_sample.append(g)
            else:
                p.grad_sample = [p.grad_sample, g]
