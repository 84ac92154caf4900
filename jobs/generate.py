#!/usr/bin/env python
"""Answer prompts with a trained model (greedy decoding).

    python jobs/generate.py [--sweep runs/sweep | --checkpoint DIR] [--file PROMPTS] [PROMPT ...]

The model is a sweep folder's best checkpoint (the one its best.json names), or the
checkpoint folder given. Prompts come as arguments and/or from a file, one per line; a
literal \\n in a prompt stands for a newline. Needs no Ray.
Exit codes: 0 success, 2 user error (missing checkpoint, empty or too long prompt).
"""

import sys

from hlbd_ray.cli import JobParser
from hlbd_ray.errors import EXIT_OK, run_cli


def main(argv: list[str]) -> int:
    parser = JobParser(description=__doc__.splitlines()[1])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--sweep", default="runs/sweep", help="sweep folder holding best.json (default: runs/sweep)")
    source.add_argument("--checkpoint", help="a checkpoint folder (holds state.pt)")
    parser.add_argument("--file", help="prompts, one per line")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                        help="default: the run's train.precision on this device")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("prompts", nargs="*", help="prompts")
    args = parser.parse_args(argv)
    # Imported after parsing so that --help answers without loading torch.
    from hlbd_ray.generate import Decoder, best_checkpoint, check_prompts, read_prompts

    prompts = read_prompts(args.prompts, args.file)
    checkpoint = args.checkpoint or best_checkpoint(args.sweep)
    decoder = Decoder.load(checkpoint, args.device, args.precision)
    for note in check_prompts(decoder, prompts):
        print(note, file=sys.stderr)
    print(f"checkpoint {checkpoint} ({decoder.precision}, context {decoder.max_len} tokens)", file=sys.stderr)
    for (_, prompt), (answer, complete) in zip(prompts, decoder.answer([p for _, p in prompts])):
        print(f"prompt: {prompt}".replace("\n", "\n        "))
        print(f"answer: {answer}".replace("\n", "\n        "))
        if not complete:
            print(f"        [cut: no [EOS] within the model's context of {decoder.max_len} tokens]")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(run_cli(main))
