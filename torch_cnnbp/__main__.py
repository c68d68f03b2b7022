"""python -m torch_cnnbp [report|bench|demo] [options]

    (no subcommand) / report   verification report: every op against PyTorch, gradcheck, the seed example
    bench                      timings against PyTorch's own kernels (see `bench --help`)
    demo                       trains a LeNet-5 of our modules beside a native one on real digits
"""
import importlib
import sys

COMMANDS = {"report": "torch_cnnbp.report", "bench": "torch_cnnbp.bench", "demo": "torch_cnnbp.demo"}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    name = argv.pop(0) if argv and argv[0] in COMMANDS else "report"
    return importlib.import_module(COMMANDS[name]).main(argv)


if __name__ == "__main__":
    sys.exit(main())
