"""The `scrimp packets` CLI is registered and the demo section prints."""
import subprocess
import sys

import scrimp.packets as P
from scrimp import cli


def test_cli_registered():
    parser = cli.build_parser()
    args = parser.parse_args(["packets", "eval", "--n", "3", "--methods", "full", "kvpacket"])
    assert args.n == 3 and args.methods == ["full", "kvpacket"]
    args = parser.parse_args(["packets", "train", "--n-train", "4", "--max-minutes", "0.5"])
    assert args.n_train == 4 and args.max_minutes == 0.5


def test_demo_section_prints():
    text = P.demo_section(quick=True)
    assert "KV Packet" in text and "store:" in text
