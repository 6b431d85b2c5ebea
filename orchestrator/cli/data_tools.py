"""Data conversions: ``itr convert-features`` (teacher features) and ``itr write-shards`` (webdataset)."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.cli.common import Subparsers
from orchestrator.errors import UserError


def cmd_convert_features(args: argparse.Namespace) -> int:
    """Convert a pickled ``.npy`` feature dict into an ``.npz (ids, features)`` without running code from it."""
    from orchestrator.teachers.feature_files import convert_features

    n, dim = convert_features(Path(args.input), Path(args.output))
    print(f"wrote {n} teacher features (D={dim}) to {args.output}; use it as teachers.image: file:{args.output}")
    return 0


def cmd_write_shards(args: argparse.Namespace) -> int:
    """Write a captions_json / karpathy split as webdataset tar shards (the layout ``data.format: webdataset``
    streams)."""
    from pydantic import ValidationError

    from orchestrator.config import DataConfig, format_validation_error
    from orchestrator.data.splits import SplitRole, load_split
    from orchestrator.data.write_shards import write_shards

    tree = {"root": args.root, "annotations": args.annotations, "clean_captions": False, "verify_images": "exists"}
    try:  # captions stored as written: the reader cleans them (data.clean_captions)
        data = DataConfig.model_validate(tree)
    except ValidationError as err:
        name, message = format_validation_error(err)
        raise UserError(message, field=f"--{name}") from None
    roles: dict[str, SplitRole] = {data.train_split: "train", data.val_split: "val", data.test_split: "test"}
    role = roles.get(args.split)
    if role is None:
        raise UserError(f"unknown split {args.split!r} (train, val or test)", field="--split")
    written = write_shards(
        load_split(data, role), Path(args.out), shard_size=args.shard_size, prefix=args.prefix, captions=args.captions
    )
    print(
        f"wrote {sum(written.counts)} samples in {len(written.paths)} shards; train on them with\n"
        f"  data.shards: {written.pattern}"
    )
    return 0


def add_data_commands(sub: Subparsers[argparse.ArgumentParser]) -> None:
    """Data conversions: ``convert-features`` (teacher features) and ``write-shards`` (webdataset)."""
    cf = sub.add_parser(
        "convert-features",
        help="convert a pickled .npy dict {image_id: array} (CUSA's Unicom "
        "features) into an .npz (ids, features) for teachers.image: file:",
    )
    cf.add_argument(
        "input",
        metavar="IN.npy",
        help="the pickled dict; read with an unpickler that accepts only numpy arrays, dicts, lists, str and int",
    )
    cf.add_argument("output", metavar="OUT.npz", help="written atomically; must differ from IN")
    cf.set_defaults(func=cmd_convert_features)

    ws = sub.add_parser(
        "write-shards",
        help="write a captions_json / karpathy split as webdataset tar shards "
        "({key}.jpg + {key}.json) for data.format: webdataset",
    )
    ws.add_argument("--root", required=True, help="captions_json: the folder with <split>.json; karpathy: image root")
    ws.add_argument("--annotations", help="karpathy: dataset_coco.json / dataset_flickr30k.json")
    ws.add_argument("--split", default="train", help="the split to write (default train)")
    ws.add_argument("--out", required=True, help="the folder the shards (and sizes.json) go to")
    ws.add_argument("--shard-size", type=int, default=1000, help="images per shard (default 1000)")
    ws.add_argument("--prefix", default="train", help="shard file names: <prefix>-000000.tar, ...")
    ws.add_argument("--captions", choices=["json", "txt"], default="json", help="{key}.json (default) or {key}.txt")
    ws.set_defaults(func=cmd_write_shards)
