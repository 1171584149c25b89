"""Classify texts with the adapter a node trained: what to do with ``--out/adapter`` once the rounds are done.

A node writes its adapter in peft's format when it stops, with ``tadlora.json`` beside it (the model, the labels,
the LoRA settings, the run seed and the model fingerprint). This script builds the same base model (offline for the
packaged MiniLM; the same path or hub id for your own), checks that it is the one the adapter was trained on, loads
the adapter and prints each text's label and its probability:

    python examples/classify_with_adapter.py runs/demo/node-0/adapter "a gripping, funny film" "dull and too long"

For a task of sentence pairs (MNLI's premise and hypothesis, QNLI's question and sentence), give ``--pairs`` and the
texts two by two. ``--json`` prints every class's probability instead. Without tadlora, peft loads the same
directory: ``PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(MODEL,
num_labels=N), "runs/demo/node-0/adapter")`` (the classification head is in the adapter), with no check that MODEL
is the base it was trained on.
"""

from __future__ import annotations

import argparse
import json
import sys

from tadlora.adapter import AdapterModel, read_export_info, resolve_device
from tadlora.training import classify


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="the adapter directory a node exported (its --out/adapter)")
    parser.add_argument("texts", nargs="+", help="the texts to classify (with --pairs: first, second, first, ...)")
    parser.add_argument("--pairs", action="store_true", help="the texts are sentence pairs, given two by two")
    parser.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens each text is cut to, at least 8 (default: the --max-length the node trained with, as its "
        "export says; 64, the node's default, for an export too old to say)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="the base model, where it is not at the path the export names (another machine, outside the "
        "container that trained it); it must be the same model, which is checked",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (default: the GPU when there is one), cpu, cuda or cuda:N"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per text, with every probability")
    args = parser.parse_args(argv)
    if args.pairs and len(args.texts) % 2:
        parser.error(f"--pairs takes the texts two by two, and {len(args.texts)} is odd")
    if args.max_length is not None and args.max_length < 8:
        parser.error(f"--max-length must be >= 8 (as a node's), got {args.max_length}")
    first = args.texts[0::2] if args.pairs else args.texts
    second = args.texts[1::2] if args.pairs else None
    try:
        model = AdapterModel.from_export(args.adapter, resolve_device(args.device), model=args.model)
        max_length = args.max_length
        if max_length is None:
            max_length = read_export_info(args.adapter).get("max_length")
            if max_length is None:
                max_length = 64
                note = "the export does not say the --max-length it was trained with (it is older than that record)"
                sys.stderr.write(f"classify_with_adapter: {note}: 64, a node's default; else give --max-length\n")
        probs = classify(model, first, second, max_length=max_length)
    except (ValueError, OSError, RuntimeError) as exc:  # a length past the model's positions is a ValueError too
        print(f"classify_with_adapter: {exc}", file=sys.stderr)
        return 2
    names = model.spec.label_names
    for i, row in enumerate(probs.tolist()):
        best = max(range(len(row)), key=row.__getitem__)
        text = first[i] if second is None else f"{first[i]} || {second[i]}"
        if args.json:
            print(json.dumps({"text": text, "label": names[best], "probabilities": dict(zip(names, row, strict=True))}))
        else:
            print(f"{names[best]:<12} {row[best]:.3f}  {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
