"""Where a rounding-level difference in the tiny-config training grows (issue 11): tangent probes.

The train step is a map F_k: state -> state' for batch k (params and momentum float32).
Forward-mode derivatives of the real step (`train.train_step`, jax.jvp through it) give:

  control   the first-order prediction of "fp32 vs initial params x (1 + 2**-20)": tangent
            2**-20 * params (all leaves) propagated along the float32 trajectory, next to
            the measured nonlinear difference (relative loss and grad-norm differences).
  lyapunov  the finite-time Lyapunov vector: the tangent of the trainable params and the
            momentum, renormalised each step, propagated along the trajectory; per step the
            growth factor ||dp_k+1|| / ||dp_k||, the Rayleigh quotient dp.H.dp / |dp|^2 of
            each loss term's Hessian along it, and (every --share-every steps) its norm share
            per module, for params and momentum. `--ablate` changes the map (see ABLATIONS);
            `--project GROUP` zeroes the tangent of a module group after every step.
  ablate    the lyapunov growth with the tangent of one module group zeroed after every
            step (same trajectory, one compiled program for all rows).
  hessian   extreme eigenvalues (power iteration on Hessian-vector products) of loss,
            loss_cls and loss_mask at a few states of the trajectory, next to SGD-momentum's
            stability edge 2 (1 + momentum) / lr.
  curves    the 10-step window losses of fp32, fp32 x (1 + 2**-20), bf16 and fp16 (as
            tests/test_precision.py measures them), with --ablate applied to all four.

  python experiments/precision_stability.py [--mode lyapunov] [--steps 30] \\
      [--ablate lr/10] [--project kernel_branch]

Data and config are tests/test_precision.py's: configs/tiny.py, the default demo preset (16
train images), one scale (160x128), one CPU device, global batch 2, PRNGKey(0) init.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# Changes of the train-step map; each is a config override or a process-local patch.
ABLATIONS = ("none", "lr/10", "lr/4", "momentum0", "loss_cls", "loss_mask", "gn_eps1e-2",
             "gn_eps1e-1", "dice_eps1", "fixed_batch", "clip1")
# Module groups of the trainable params (first matching key-path fragment wins).
GROUPS = (("kernel_branch", ("kernel_convs_", "conv_kernel")),
          ("cls_branch", ("cls_convs_", "conv_cls")),
          ("mask_feat", ("mask_feature_head",)),
          ("neck", ("neck",)),
          ("backbone", ("backbone",)))


def group_of(key: str) -> str:
    for name, frags in GROUPS:
        if any(f in key for f in frags):
            return name
    return "other"


def setup(args):
    """(config, demo builder, host batches [1, B, ...]) as tests/test_precision.py."""
    from configs import tiny
    from solov2_jax import train
    from solov2_jax.data import coco_builder, pipeline
    from solov2_jax.data.make_demo import make_demo

    root = Path(args.workdir)
    if not (root / "demo").exists():
        make_demo(str(root / "demo"), num_train=16, num_val=4)
    builder, _ = coco_builder.prepare(str(root / "demo"), str(root / "tfds"), progress=False)
    c = tiny.get_config()
    c.data.coco_dir, c.data.data_dir = str(root / "demo"), str(root / "tfds")
    c.data.train_scales = ((160, 128),)
    c.train.log_every = 10
    # Forward-mode derivatives cannot pass the CPU's custom-VJP convolution ('auto'); XLA's
    # own convolution computes the same forward (bitwise) and weight gradients to 1e-5.
    c.model.conv_impl = args.conv_impl
    ds = pipeline.train_dataset(builder, c.data, num_local_devices=1, seed=0)
    it = pipeline.as_numpy_batches(ds)
    batches = [{k: np.asarray(b[k]) for k in train.STEP_KEYS}
               for b, _ in zip(it, range(args.warm_steps + args.steps), strict=False)]
    return c, builder, batches


def apply_ablation(cfg, ablation: str):
    """Config overrides / process-local patches of one ablation (before building)."""
    from solov2_jax import losses, train
    from solov2_jax.models import layers

    layers.GN_EPS = 1e-5
    train.solov2_loss = losses.solov2_loss
    if ablation in ("lr/10", "lr/4"):
        cfg.optim.lr = cfg.optim.lr / float(ablation[3:])
    elif ablation == "momentum0":
        cfg.optim.momentum = 0.0
    elif ablation == "clip1":
        cfg.optim.grad_clip_norm = 1.0
    elif ablation.startswith("gn_eps"):
        layers.GN_EPS = float(ablation[6:])
    elif ablation == "dice_eps1":
        cfg.loss.dice_eps = 1.0
    elif ablation in ("loss_cls", "loss_mask"):
        def only(*a, **kw):
            out = losses.solov2_loss(*a, **kw)
            return dict(out, loss=out[ablation])
        train.solov2_loss = only
    return cfg


class Run:
    """One configuration: model, optimiser, an unpmapped jitted step and its jvp."""

    def __init__(self, cfg, builder, prec="fp32"):
        from solov2_jax import optim, precision, train
        from solov2_jax.losses import loss_kwargs
        from solov2_jax.structures import DATA_AXIS
        from solov2_jax.targets import target_kwargs

        cfg.train.precision = prec
        self.cfg = cfg
        n = builder.info.splits["train"].num_examples
        model, tx, schedule, trainable, _, _ = train.build_training(cfg, n, 2)
        self.model, self.schedule, self.trainable = model, schedule, trainable
        self.state0 = train.create_train_state(cfg, jax.random.PRNGKey(0), model=model, tx=tx)
        step = train.bind_train_step(cfg, model, tx, schedule, trainable)
        # pmean over a vmapped axis of size 1: the pmapped step's maths on one device.
        vstep = jax.vmap(step, in_axes=(None, 0), axis_name=DATA_AXIS)

        def one(state, batch):
            new, m = vstep(state, batch)
            return jax.tree.map(lambda x: x[0], (new, m))

        self.step = jax.jit(one)

        def tangent_step(state, tangent, batch):
            (new, m), (dnew, dm) = jax.jvp(lambda s: one(s, batch), (state,), (tangent,))
            return new, m, dnew, dm

        self.tangent_step = jax.jit(tangent_step)

        def loss_terms(params, batch):
            from solov2_jax.losses import solov2_loss
            from solov2_jax.targets import batch_targets

            b = jax.tree.map(lambda x: x[0], batch)
            variables = {"params": params, "batch_stats": self.state0.batch_stats}
            out = precision.widen_floats(model.apply(variables, b["image"], b.get("canvas")))
            t = batch_targets(b["gt_boxes"], b["gt_labels"], b["gt_centers"], b["gt_valid"],
                              b.get("canvas"), featmap_hw=out.mask_feats.shape[1:3],
                              **{k: v for k, v in target_kwargs(cfg, (0, 0)).items()
                                 if k != "featmap_hw"})
            kw = dict(loss_kwargs(cfg), axis_name=None, normalization="per_device")
            return solov2_loss(out.kernel_preds, out.cls_preds, out.mask_feats, t,
                               b["gt_masks"], b.get("canvas"), **kw)

        def hvp(params, v, batch, term):
            """H_term v for the trainable leaves (v: a full params tree, frozen leaves 0)."""
            tr, fr = optim.partition(params, trainable)
            vt, _ = optim.partition(v, trainable)

            def g(tp):
                return jax.grad(lambda p: loss_terms(optim.merge(p, fr), batch)[term])(tp)
            _, hv = jax.jvp(g, (tr,), (vt,))
            return optim.merge(hv, jax.tree.map(jnp.zeros_like, fr))

        self.hvp = jax.jit(hvp, static_argnums=3)
        self.loss_terms = jax.jit(loss_terms)


def leaf_info(state, trainable):
    """[(key, kind)] over the state's leaves: kind 'p' trainable param, 'pf' frozen param,
    'm' momentum (trace) of a trainable param, '' anything else."""
    from flax import traverse_util

    mask = {"/".join(k): v for k, v in traverse_util.flatten_dict(trainable).items()}
    out = []
    for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]:
        names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", "")))) for k in path]
        key = "/".join(names)
        if names[0] == "params":
            out.append((key, "p" if mask["/".join(names[1:])] else "pf"))
        elif "trace" in names:
            out.append((key, "m"))
        else:
            out.append((key, ""))
    return out


def norms(tree, info, kind, by_group=False):
    leaves = jax.tree.leaves(tree)
    sq = {}
    for (key, k), x in zip(info, leaves, strict=True):
        if k == kind:
            g = group_of(key) if by_group else "all"
            sq[g] = sq.get(g, 0.0) + float(jnp.sum(jnp.square(x.astype(jnp.float32))))
    return sq


def make_tangent(state, info, fill):
    """Tangent tree: fill(key, kind, leaf) for float leaves, float0 zeros for the rest."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    out = []
    for (key, kind), x in zip(info, leaves, strict=True):
        if jnp.issubdtype(x.dtype, jnp.floating):
            out.append(jnp.asarray(fill(key, kind, x), x.dtype))
        else:
            out.append(np.zeros(np.shape(x), jax.dtypes.float0))
    return jax.tree_util.tree_unflatten(treedef, out)


def rescale(tangent, info, factor, project=()):
    leaves, treedef = jax.tree_util.tree_flatten(tangent)
    out = []
    for (key, kind), x in zip(info, leaves, strict=True):
        if x.dtype == jax.dtypes.float0:
            out.append(x)
        elif kind in ("p", "m") and group_of(key) not in project:
            out.append(x * factor)
        else:
            out.append(jnp.zeros_like(x))
    return jax.tree_util.tree_unflatten(treedef, out)


def rayleigh(run, state, dparams, batch, terms=("loss_cls", "loss_mask")):
    """(dp.H_term.dp / |dp|^2, |H_term dp| / |dp|) over the trainable params, per term."""
    tr_mask = run.trainable
    dp = jax.tree.map(lambda x, t: x if t else jnp.zeros_like(x), dparams, tr_mask)
    den = sum(float(jnp.vdot(x, x)) for x in jax.tree.leaves(dp))
    out = {}
    for term in terms:
        hv = run.hvp(state.params, dp, batch, term)
        out[term] = (sum(float(jnp.vdot(a, b)) for a, b in
                         zip(jax.tree.leaves(dp), jax.tree.leaves(hv), strict=True)) / den,
                     (sum(float(jnp.vdot(a, a)) for a in jax.tree.leaves(hv)) / den) ** 0.5)
    return out


def mode_control(args, cfg, builder, batches):
    """First-order prediction vs the measured fp32 / fp32 x (1 + 2**-20) difference."""
    eps = 2.0 ** -20
    run = Run(cfg, builder)
    info = leaf_info(run.state0, run.trainable)
    s_ref, s_pert = run.state0, run.state0.replace(
        params=jax.tree.map(lambda x: x * (1 + eps), run.state0.params))
    t = make_tangent(run.state0, info,
                     lambda k, kind, x: eps * x if kind in ("p", "pf") else 0 * x)
    print("step   lr        loss      rel dloss: lin  measured   rel dgnorm: lin  measured"
          "   ||dp||/||p||: lin  measured")
    for i, b in enumerate(batches):
        s_new, m, t, dm = run.tangent_step(s_ref, t, b)
        s_pert, mp = run.step(s_pert, b)
        dp_meas = jax.tree.map(lambda a, c: a - c, s_pert.params, s_new.params)
        pn = norms(s_new, info, "p")["all"] ** 0.5
        lin = norms(t, info, "p")["all"] ** 0.5 / pn
        meas = sum(float(jnp.sum(jnp.square(x))) for x, (_, k) in
                   zip(jax.tree.leaves(dp_meas), [z for z in info if z[0].startswith("params")],
                       strict=True) if k == "p") ** 0.5 / pn
        s_ref = s_new
        print(f"{i + 1:4d} {float(m['lr']):.5f} {float(m['loss']):9.4f} "
              f"{abs(float(dm['loss'])) / float(m['loss']):14.2e} "
              f"{abs(float(mp['loss']) - float(m['loss'])) / float(m['loss']):10.2e} "
              f"{abs(float(dm['grad_norm'])) / float(m['grad_norm']):16.2e} "
              f"{abs(float(mp['grad_norm']) - float(m['grad_norm'])) / float(m['grad_norm']):10.2e}"
              f" {lin:18.2e} {meas:10.2e}", flush=True)


def lyapunov(args, cfg, builder, batches, project=(), verbose=True, run=None):
    """Growth factors of the renormalised tangent along the trajectory; returns them."""
    run = run or Run(cfg, builder)
    info = leaf_info(run.state0, run.trainable)
    state = run.state0
    for b in batches[:args.warm_steps]:  # plain float32 training before the probe
        state, _ = run.step(state, b)
    batches = batches[args.warm_steps:]
    # Seeded where rounding enters: a random unit direction of the momentum (the gradient
    # of step 1), params untouched; then renormalised by |dm| after every step.
    rng = np.random.default_rng(0)
    t = make_tangent(run.state0, info, lambda k, kind, x: rng.standard_normal(x.shape)
                     if kind == "m" else 0 * x)
    t = rescale(t, info, 1.0 / norms(t, info, "m")["all"] ** 0.5, project)
    growth = []
    fixed = args.ablate == "fixed_batch"
    if verbose:
        print("step   lr       loss   |dm| growth  |dp|/|dm|  dgnorm/gnorm  dL_cls/L  dL_mask/L"
              + ("   R_cls  |Hv|_cls  R_mask |Hv|_mask" if args.rayleigh else ""))
    for i in range(len(batches)):
        b = batches[0] if fixed else batches[i]
        new, m, t2, dm = run.tangent_step(state, t, b)
        np_, nm = norms(t2, info, "p")["all"] ** 0.5, norms(t2, info, "m")["all"] ** 0.5
        growth.append(nm)  # |dm| was 1 before the step
        line = (f"{i + 1:4d} {float(m['lr']):.5f} {float(m['loss']):8.4f} {nm:8.3f} "
                f"{np_ / nm:10.2e} {float(dm['grad_norm']) / float(m['grad_norm']):12.3e} "
                f"{float(dm['loss_cls']) / float(m['loss']):9.2e} "
                f"{float(dm['loss_mask']) / float(m['loss']):9.2e}")
        t = rescale(t2, info, 1.0 / nm, project)
        if args.rayleigh and (i + 1) % args.share_every == 0:
            r = rayleigh(run, new, t.params, b)
            line += "".join(f" {r[k][0]:7.1f} {r[k][1]:8.1f}" for k in ("loss_cls", "loss_mask"))
        if verbose:
            print(line, flush=True)
        if verbose and (i + 1) % args.share_every == 0:
            for kind, label in (("p", "params"), ("m", "momentum")):
                sq = norms(t, info, kind, by_group=True)
                tot = sum(sq.values())
                print(f"      share of |d{label}|^2: " + ", ".join(
                    f"{g} {v / tot:.3f}" for g, v in sorted(sq.items(), key=lambda kv: -kv[1])))
            if args.leaves:
                sq = {}
                for (key, kind), x in zip(info, jax.tree.leaves(t), strict=True):
                    if kind == "p":
                        sq[key] = float(jnp.sum(jnp.square(x)))
                tot = sum(sq.values())
                top = sorted(sq.items(), key=lambda kv: -kv[1])[:args.leaves]
                print("      top param leaves: " + "; ".join(
                    f"{k.removeprefix('params/')} {v / tot:.3f}" for k, v in top))
        state = new
    return np.array(growth), run


def mode_hessian(args, cfg, builder, batches):
    run = Run(cfg, builder)
    state = run.state0
    at = {int(s) for s in args.hessian_steps}
    mom = float(cfg.optim.momentum)
    print("step  lr       edge 2(1+m)/lr   term        lambda_max   lambda_min")
    for i, b in enumerate(batches):
        if i in at:
            lr = float(run.schedule(i))
            for term in ("loss", "loss_cls", "loss_mask"):
                lmax, lmin = extreme_eigs(run, state, b, term, args.power_iters)
                print(f"{i:4d} {lr:.5f} {2 * (1 + mom) / lr:12.0f}      {term:10s} "
                      f"{lmax:12.1f} {lmin:12.1f}", flush=True)
        if i >= max(at):
            break
        state, _ = run.step(state, b)


def extreme_eigs(run, state, batch, term, iters):
    """(largest, smallest) eigenvalue of the trainable-params Hessian of `term`."""
    key = jax.random.PRNGKey(1)
    leaves, treedef = jax.tree.flatten(state.params)
    keys = jax.random.split(key, len(leaves))
    v0 = jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in
                                      zip(keys, leaves, strict=True)])
    v0 = jax.tree.map(lambda x, t: x if t else jnp.zeros_like(x), v0, run.trainable)

    def power(shift):
        v = v0
        lam = 0.0
        for _ in range(iters):
            n = sum(float(jnp.vdot(x, x)) for x in jax.tree.leaves(v)) ** 0.5
            v = jax.tree.map(lambda x, n=n: x / n, v)
            hv = run.hvp(state.params, v, batch, term)
            hv = jax.tree.map(lambda a, x: a - shift * x, hv, v)
            lam = sum(float(jnp.vdot(a, x)) for a, x in
                      zip(jax.tree.leaves(hv), jax.tree.leaves(v), strict=True))
            v = hv
        return lam + shift

    big = power(0.0)  # the eigenvalue of largest magnitude
    other = power(big)  # the far end of the spectrum, shifted by it
    return max(big, other), min(big, other)


def mode_curves(args, cfg, builder, batches):
    import copy

    from solov2_jax import precision

    runs = {}
    for name, prec, eps in (("fp32", "fp32", 0.0), ("fp32+2^-20", "fp32", 2.0 ** -20),
                            ("bf16", "bf16", 0.0), ("fp16", "fp16", 0.0)):
        run = Run(copy.deepcopy(cfg), builder, prec)
        state = run.state0
        if eps:
            state = state.replace(params=jax.tree.map(lambda x, e=eps: x * (1 + e), state.params))
        if prec == "fp16":
            assert precision.name(run.cfg) == "fp16"
        loss = []
        for b in batches:
            state, m = run.step(state, b)
            loss.append(float(m["loss"]))
        runs[name] = np.array(loss)
    w = 10
    ref = runs["fp32"].reshape(-1, w).mean(1)
    print(f"fp32 window losses: {np.round(ref, 4).tolist()}")
    print("run          " + " ".join(f"step {w * (i + 1):3d}" for i in range(len(ref)))
          + "   max per-step")
    for name in ("fp32+2^-20", "bf16", "fp16"):
        x = runs[name].reshape(-1, w).mean(1)
        rel = np.abs(x - ref) / ref
        per = np.abs(runs[name] - runs["fp32"]) / runs["fp32"]
        print(f"{name:12s} " + " ".join(f"{r * 100:7.2f}%" for r in rel)
              + f"   {per.max() * 100:.1f}%")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="lyapunov",
                   choices=("control", "lyapunov", "hessian", "curves", "ablate"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ablate", default="none", choices=ABLATIONS)
    p.add_argument("--project", nargs="*", default=[],
                   help="module groups whose tangent is zeroed after every step")
    p.add_argument("--warm-steps", type=int, default=0,
                   help="float32 training steps before the probe (lyapunov, ablate)")
    p.add_argument("--share-every", type=int, default=5)
    p.add_argument("--leaves", type=int, default=0, help="print the top-N param leaves")
    p.add_argument("--rayleigh", action="store_true",
                   help="also the per-term Rayleigh quotients along the tangent")
    p.add_argument("--hessian-steps", nargs="*", default=[0, 8, 16])
    p.add_argument("--power-iters", type=int, default=20)
    p.add_argument("--conv-impl", default="xla", help="config.model.conv_impl ('auto' "
                   "is the tests' CPU default, usable in --mode curves only)")
    p.add_argument("--workdir", default="/tmp/precision_stability")
    args = p.parse_args()
    t0 = time.time()
    # Recompiling the forward-over-reverse step takes minutes: keep the programs.
    jax.config.update("jax_compilation_cache_dir", str(Path(args.workdir) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    cfg, builder, batches = setup(args)
    cfg = apply_ablation(cfg, args.ablate)
    print(f"mode {args.mode}, ablation {args.ablate}, projected out {args.project or '-'}, "
          f"lr {cfg.optim.lr}, momentum {cfg.optim.momentum}, {len(batches)} steps")
    if args.mode == "control":
        mode_control(args, cfg, builder, batches)
    elif args.mode == "lyapunov":
        g, _ = lyapunov(args, cfg, builder, batches, tuple(args.project))
        lo = min(5, len(g) - 1)
        print(f"geometric-mean growth per step, steps {lo + 1}-{len(g)}: "
              f"{np.exp(np.mean(np.log(g[lo:]))):.3f}")
    elif args.mode == "ablate":
        run, rows = None, []
        for proj in ((), ("kernel_branch",), ("mask_feat",), ("backbone", "neck"),
                     ("cls_branch",)):
            g, run = lyapunov(args, cfg, builder, batches, proj, verbose=False, run=run)
            rows.append((proj, g))
            print(f"projected out {'+'.join(proj) or '-':28s} growth of |dm| per step: "
                  + " ".join(f"{x:.2f}" for x in g), flush=True)
        print("geometric mean per 5-step window:")
        for proj, g in rows:
            w = [np.exp(np.mean(np.log(g[i:i + 5]))) for i in range(0, len(g), 5)]
            print(f"  {'+'.join(proj) or '-':28s} " + " ".join(f"{x:.2f}" for x in w))
    elif args.mode == "hessian":
        mode_hessian(args, cfg, builder, batches)
    elif args.mode == "curves":
        mode_curves(args, cfg, builder, batches)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
