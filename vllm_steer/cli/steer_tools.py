"""The steer-tool subcommands: train, inspect, keywords, explain, transfer, compose and convert,
each an `add_` (its arguments) and a `run_` (one call into `vllm_steer.tools`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .arguments import name_value_pairs


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a steer on labelled text (cached hidden states: fast)",
                       description="Train an LM-Steer. Defaults follow the reference recipe; padding is masked.")
    src = p.add_argument_group("data")
    src.add_argument("--data", help="JSONL or CSV with 'text' and a label in [-1, 1] ('label', or one column per dim)")
    src.add_argument("--positive", help="plain text, one positive example (+1) per line")
    src.add_argument("--negative", help="plain text, one negative example (-1) per line")
    p.add_argument("--model", required=True, help="base model: folder or name loadable by transformers")
    p.add_argument("--output", "-o", required=True, help="the steer file to write (.safetensors)")
    p.add_argument("--name", action="append", help="a trained dim's name; repeat for several (default: steer)")
    p.add_argument("--bias-name", default="bias", help="name of the dim held at --bias-value (default %(default)s)")
    p.add_argument("--bias-value", type=float, default=1.0)
    p.add_argument("--no-bias", action="store_true", help="no bias dim (training vector is the labels alone)")
    p.add_argument("--rank", type=int, help="rank r (default min(1000, D))")
    p.add_argument("--epsilon", type=float, default=1e-3)
    p.add_argument("--init-std", type=float, default=0.01)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--l2", type=float, default=0.0, help="L2 weight on |P1|^2 + |P2|^2 (default 0)")
    p.add_argument("--head-dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the LM-head matmuls while training (bfloat16: about 2x faster on CPUs with bf16)")
    p.add_argument("--value-scale", type=float, default=1.0,
                   help="after training, scale the trained dims by this, so value v acts as v * SCALE of the "
                        "trained steer: puts the recommended value where you want it (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--cache-dir", help="also keep the hidden-state cache on disk here (reused when it matches)")
    p.add_argument("--checkpoint", help="side file for optimizer state and step (default OUTPUT.ckpt)")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep the side file after finishing")
    p.add_argument("--save-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--base-model-name", help="the base_model written in the file (default: --model)")
    p.add_argument("--max-abs-value", type=float, help="the largest |value| you vouch for (servers enforce it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> None:
    import torch

    from vllm_steer.tools.training import TrainConfig, train_steer
    from vllm_steer.tools.training_data import load_labelled_file, load_text_pair

    names = args.name or ["steer"]
    if args.data:
        examples = load_labelled_file(args.data, names)
        files = [args.data]
    elif args.positive and args.negative:
        if len(names) != 1:
            raise ValueError("--positive/--negative train a single dim; give one --name")
        examples = load_text_pair(args.positive, args.negative)
        files = [args.positive, args.negative]
    else:
        raise ValueError("give --data FILE, or both --positive and --negative")
    config = TrainConfig(
        dim_names=names, bias_dim=None if args.no_bias else args.bias_name, bias_value=args.bias_value,
        rank=args.rank, epsilon=args.epsilon, init_std=args.init_std, lr=args.lr, steps=args.steps,
        batch_size=args.batch_size, max_length=args.max_length, seed=args.seed, l2=args.l2,
        head_dtype=args.head_dtype, value_scale=args.value_scale,
    )
    checkpoint = args.checkpoint or str(args.output) + ".ckpt"
    steer, result = train_steer(
        config, args.model, examples, data_files=files, device=args.device, base_model=args.base_model_name,
        cache_dir=args.cache_dir, checkpoint=checkpoint, checkpoint_every=args.checkpoint_every,
        resume=args.resume, progress=not args.quiet, max_abs_value=args.max_abs_value,
    )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    steer.save(args.output, dtype=getattr(torch, args.save_dtype))
    if not args.keep_checkpoint:
        Path(checkpoint).unlink(missing_ok=True)
    h = steer.header
    print(f"wrote {args.output}: dims {list(h.dim_names)}, rank {h.rank}, eps {h.epsilon}, "
          f"{len(examples)} examples, loss {h.recipe['first_loss']} -> {h.recipe['final_loss']}, "
          f"times {h.recipe['seconds']}")


def add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="print what a steer file is: dims, rank, eps, base model, recipe")
    p.add_argument("file")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_inspect)


def run_inspect(args: argparse.Namespace) -> None:
    from vllm_steer.steer.file import SteerFile

    steer = SteerFile.load(args.file)
    if args.json:
        print(json.dumps(describe(steer), indent=2))
        return
    for key, value in describe(steer).items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value)
        print(f"{key:>15}: {value}")


def describe(steer) -> dict:
    """What `inspect` prints: the header in words."""
    h = steer.header
    return {
        "dims": list(h.dim_names),
        "primary dim": h.primary_dim,
        "bias dims": h.bias_dims,
        "K": h.num_dims,
        "hidden size D": h.hidden_size,
        "rank r": h.rank,
        "epsilon": h.epsilon,
        "parameters": int(steer.projector1.numel() + steer.projector2.numel()),
        "dtype": str(steer.projector1.dtype).replace("torch.", ""),
        "base model": h.base_model,
        "fingerprint": "yes" if h.fingerprint else "no",
        "max |value|": h.max_abs_value,
        "source": h.source,
        "recipe": h.recipe,
    }


def add_keywords(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keywords", help="the words a steer dim promotes and suppresses (SVD of P1 P2^T)")
    p.add_argument("file")
    p.add_argument("--model", required=True, help="the model whose output embeddings rank the vocabulary")
    p.add_argument("--dim", help="the dim to read (default: the primary dim)")
    p.add_argument("--directions", type=int, default=3, help="top singular directions (default %(default)s)")
    p.add_argument("--top", type=int, default=12, help="words per side (default %(default)s)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_keywords)


def run_keywords(args: argparse.Namespace) -> None:
    from vllm_steer.steer.file import SteerFile
    from vllm_steer.tools.hf_model import load_frozen_model, output_head
    from vllm_steer.tools.keywords import keyword_table, mean_context, steer_keywords

    steer = SteerFile.load(args.file)
    lm, tokenizer = load_frozen_model(args.model)
    weight, _ = output_head(lm)
    result = steer_keywords(steer, weight, tokenizer, dim=args.dim, directions=args.directions, top=args.top,
                            context=mean_context(lm, tokenizer))
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else keyword_table(result))


def add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explain", help="the tokens and spans of a text that most indicate a steer's style")
    p.add_argument("file")
    p.add_argument("text", help="the text ('-' reads stdin)")
    p.add_argument("--model", required=True)
    p.add_argument("--dim", help="the dim to contrast (default: the primary dim)")
    p.add_argument("--value", type=float, default=1.0, help="contrast +value against -value (default 1)")
    p.add_argument("--max-span", type=int, default=10)
    p.add_argument("--top", type=int, default=5, help="spans to list (default %(default)s)")
    p.add_argument("--html", help="also write a highlighted HTML page here")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-color", action="store_true")
    p.set_defaults(func=run_explain)


def run_explain(args: argparse.Namespace) -> None:
    from vllm_steer.steer.file import SteerFile
    from vllm_steer.tools.explain import explain_text, explanation_html, explanation_terminal
    from vllm_steer.tools.hf_model import load_frozen_model

    steer = SteerFile.load(args.file)
    lm, tokenizer = load_frozen_model(args.model)
    text = args.text if args.text != "-" else sys.stdin.read()
    result = explain_text(steer, lm, tokenizer, text, dim=args.dim, value=args.value, max_span=args.max_span,
                          span_count=args.top)
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(explanation_terminal(result, color=not args.no_color))
    if args.html:
        Path(args.html).write_text(explanation_html(result))
        print(f"wrote {args.html}", file=sys.stderr)


def add_transfer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("transfer", help="move a steer to a model with other embeddings (shared-vocabulary fit)")
    p.add_argument("file")
    p.add_argument("--from", dest="source_model", required=True, help="the model the steer was trained for")
    p.add_argument("--to", dest="target_model", required=True, help="the model to transfer it to")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--normalize-rows", action="store_true",
                   help="scale each row of the map B to unit length, as the reference does (default: off)")
    p.add_argument("--max-tokens", type=int, help="fit on at most this many shared tokens (default: all)")
    p.add_argument("--base-model-name", help="the base_model written in the file (default: --to)")
    p.add_argument("--keep-dtype", action="store_true", help="save in the source file's dtype (default: float32)")
    p.set_defaults(func=run_transfer)


def run_transfer(args: argparse.Namespace) -> None:
    from vllm_steer.tools.transfer import transfer_between_models

    steer, report = transfer_between_models(args.file, args.source_model, args.target_model,
                                            normalize_rows=args.normalize_rows, max_tokens=args.max_tokens,
                                            base_model=args.base_model_name)
    steer.save(args.output, dtype=steer.projector1.dtype if args.keep_dtype else None)
    print(json.dumps(report, indent=2))
    print(f"wrote {args.output}", file=sys.stderr)


def add_compose(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compose", help="combine steers into one file with all their dims")
    p.add_argument("files", nargs="+", metavar="[NAME=]FILE", help="steer files; dims are prefixed NAME_")
    p.add_argument("--output", "-o", required=True)
    p.add_argument("--scale", action="append", default=[], metavar="NAME=FACTOR",
                   help="scale a source steer (or one dim, NAME_DIM=FACTOR) by a factor, folded into P2")
    p.add_argument("--primary", help="the composed file's primary dim (default: the first source's)")
    p.set_defaults(func=run_compose)


def run_compose(args: argparse.Namespace) -> None:
    from vllm_steer.tools.compose import compose_steers

    files = [spec if "=" in spec else f"{Path(spec).stem}={spec}" for spec in args.files]
    steer = compose_steers(name_value_pairs(files, "compose", "[NAME=]FILE"),
                           scales=name_value_pairs(args.scale, "--scale", "NAME=FACTOR", float), primary=args.primary)
    steer.save(args.output)
    h = steer.header
    print(f"wrote {args.output}: dims {list(h.dim_names)} (primary {h.primary_dim}, bias {h.bias_dims}), "
          f"rank {h.rank}, eps {h.epsilon}")


def add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert", help="import a reference LM-Steer checkpoint (.pt) as a steer file",
        description="Import a checkpoint saved by the LM-Steer reference code: train.py's "
                    "[Namespace, projectors, step] or steer_transfer.py's [None, projectors, step]. What the "
                    "checkpoint does not say (a transferred file records neither eps nor its dummy dim) must be "
                    "given, or assumed with --assume-defaults. DIM is an index 0..K-1 or a --dim-names name.")
    p.add_argument("checkpoint", help="the reference's torch.save file (read without running code from it)")
    p.add_argument("output", help="the .safetensors steer file to write")
    p.add_argument("--model", help="the base model (folder or name) to fingerprint, so loading onto another fails")
    p.add_argument("--dim-names", help="comma-separated names for the K dims (default: steer, bias, dimN)")
    p.add_argument("--epsilon", type=float, help="the steer's eps (overrides the Namespace's)")
    p.add_argument("--primary-dim", metavar="DIM",
                   help="the dim a scalar request value sets (overrides training_steer)")
    p.add_argument("--bias-dim", action="append", default=[], metavar="DIM=VALUE",
                   help="a dim held at VALUE whenever the steer is used, e.g. the reference's dummy dim: 1=1 "
                        "(repeatable; overrides dummy_steer)")
    p.add_argument("--no-bias-dim", action="store_true", help="the steer has no bias dims (overrides dummy_steer)")
    p.add_argument("--assume-defaults", action="store_true",
                   help="assume the reference README's recipe for what the checkpoint does not say: eps 1e-3, "
                        "primary dim 0, dim 1 held at 1 when K=2")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="unpickle the checkpoint fully even if it holds objects other than tensors and a "
                        "Namespace (runs any code the file names: only for files you trust)")
    p.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> None:
    from vllm_steer.tools.reference import ConvertOptions, convert_reference_checkpoint, head_bias_warning

    if args.no_bias_dim and args.bias_dim:
        raise ValueError("--no-bias-dim and --bias-dim contradict each other: give one")
    bias_dims = name_value_pairs(args.bias_dim, "--bias-dim", "DIM=VALUE", float) or ({} if args.no_bias_dim else None)
    options = ConvertOptions(epsilon=args.epsilon, primary_dim=args.primary_dim, bias_dims=bias_dims,
                             dim_names=args.dim_names.split(",") if args.dim_names else None,
                             assume_defaults=args.assume_defaults, trust_pickle=args.trust_checkpoint)
    embedding, warning = None, None
    if args.model:
        from vllm_steer.tools.hf_model import load_output_head

        embedding, head_bias = load_output_head(args.model)
        warning = head_bias_warning(args.model, head_bias)
    conversion = convert_reference_checkpoint(args.checkpoint, options, output_embedding=embedding,
                                              base_model=args.model)
    steer = conversion.steer
    if warning:
        print(f"vllm-steer convert: warning: {warning}", file=sys.stderr)
        steer = steer.with_header(recipe={**steer.header.recipe, "head_bias_warning": warning})
    steer.save(args.output)
    h = steer.header
    print(conversion.report())
    print(f"wrote {args.output}: dims {list(h.dim_names)} (primary {h.primary_dim}, bias {h.bias_dims}), "
          f"D={h.hidden_size}, r={h.rank}, eps={h.epsilon:g}, base model {h.base_model}, "
          f"fingerprint {'yes' if h.fingerprint else 'no (pass --model to add one)'}")


COMMANDS = [add_train, add_inspect, add_keywords, add_explain, add_transfer, add_compose, add_convert]
