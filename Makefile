# Fuzzing and the long runs of the reliability tests (README "Guarantees").
# CI runs a bounded slice of all of this through `python -m pytest`.
PYTHON ?= python
FUZZ_SECONDS ?= 600

.PHONY: sanitized fuzz long

sanitized:  # embfile built with ASan + UBSan (gcc) into build/sanitized; `. build/sanitized.env` runs it
	mkdir -p build && $(PYTHON) fuzz/sanitized.py > build/sanitized.env

fuzz:  # coverage-guided (atheris + libFuzzer) over every read path; needs clang and atheris
	mkdir -p build && $(PYTHON) fuzz/sanitized.py --fuzz > build/fuzz.env
	$(PYTHON) fuzz/fuzz_reader.py --corpus build/fuzz-corpus
	. build/fuzz.env && cd fuzz && $(PYTHON) fuzz_reader.py ../build/fuzz-corpus -max_total_time=$(FUZZ_SECONDS) \
		-artifact_prefix=../build/fuzz- -rss_limit_mb=4096 -timeout=60 -print_final_stats=1

long:  # the reliability tests at full length: every bit flipped, more kill points, longer stress
	HYPOTHESIS_PROFILE=expensive $(PYTHON) -m pytest tests/test_hostile.py tests/test_sanitized.py \
		tests/test_crashes.py tests/test_stress.py
