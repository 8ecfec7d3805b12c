"""Coverage-guided fuzzing of every read path with atheris (libFuzzer).

An input is one byte of mode and then a file.  Mode bit 0 reseals the file
(header and section checksums recomputed, as an adversary would), so that
libFuzzer's mutations reach the structural checks and the native core behind
them instead of stopping at a checksum.  A case fails when :mod:`exercise`
finds a bug; a sanitizer report or a crash stops the run with the input saved.

Run it through ``make fuzz`` (a clang build with ASan, UBSan and coverage of
the C core; atheris covers the Python layer):

    make fuzz FUZZ_SECONDS=600
"""

import os
import sys

import atheris

with atheris.instrument_imports(include=["embfile"]):  # Python coverage of embfile's own modules
    import exercise
    import mutate

CASE = f"/dev/shm/embfile-fuzz-{os.getpid()}.emb"


def write_corpus(folder):
    """The seed files, each plain and resealed, as fuzz inputs."""
    import tempfile

    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, _) in mutate.write_seeds(tmp).items():
            with open(path, "rb") as f:
                data = f.read()
            for mode in (0, 1):
                with open(os.path.join(folder, f"{name}-{mode}"), "wb") as f:
                    f.write(bytes([mode]) + data)


def test_one_input(data):
    if not data:
        return
    body = mutate.apply(data[1:], [], reseal=bool(data[0] & 1))
    with open(CASE, "wb") as f:
        f.write(body)
    bugs = exercise.run(CASE, ["sp|P00007|PROT_HUMAN", "UniRef50_000000000037"])["bugs"]
    if bugs:
        raise AssertionError("; ".join(bugs))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--corpus"]:
        write_corpus(sys.argv[2])
        sys.exit()
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
