#!/usr/bin/env bash
# Runs every fuzz target for a short while from the committed seeds.
#
#   fuzz/run-briefly.sh                      # 20 s per target
#   FUZZ_SECONDS=600 fuzz/run-briefly.sh     # longer
#   FUZZ_TARGETS="config control" fuzz/run-briefly.sh
#
# Installs cargo-fuzz (and the nightly toolchain) if missing, builds the
# targets, and runs each with -max_len=4096 from fuzz/seeds/<target>, growing a
# scratch corpus in fuzz/target/corpus/<target> (kept between runs, never
# committed). Exits non-zero if a target fails to build or finds a crash,
# printing each crashing input as hex; the input is kept in
# fuzz/artifacts/<target>/ and reproduces with
#   cargo +nightly fuzz run <target> fuzz/artifacts/<target>/crash-...
set -euo pipefail
cd "$(dirname "$0")"

seconds=${FUZZ_SECONDS:-20}
targets=${FUZZ_TARGETS:-rfc2217 control config manifest}
toolchain=${FUZZ_TOOLCHAIN:-nightly}
sanitizer=${FUZZ_SANITIZER:-address}
start=$SECONDS

if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1; then
    echo "run-briefly: installing the $toolchain toolchain"
    rustup toolchain install "$toolchain" --profile minimal
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run-briefly: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

host=$(rustup run "$toolchain" rustc -vV | sed -n 's/^host: //p')
echo "run-briefly: building the targets ($toolchain, $host, sanitizer $sanitizer)"
if [ -z "${FUZZ_TARGETS:-}" ]; then
    cargo "+$toolchain" fuzz build --sanitizer "$sanitizer"
else
    for t in $targets; do
        cargo "+$toolchain" fuzz build --sanitizer "$sanitizer" "$t"
    done
fi
bin=target/$host/release
echo "run-briefly: built in $((SECONDS - start)) s"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_odr_violation=0}
failed=()
for t in $targets; do
    corpus=target/corpus/$t
    artifacts=artifacts/$t
    log=target/fuzz-$t.log
    mkdir -p "$corpus" "$artifacts"
    cp seeds/"$t"/* "$corpus"/
    dict=()
    case $t in
        rfc2217) dict=(-dict=dicts/rfc2217.dict) ;;
        control | manifest) dict=(-dict=dicts/json.dict) ;;
        config) dict=(-dict=dicts/config.dict) ;;
    esac
    before=$(find "$artifacts" -type f | sort)
    echo "run-briefly: $t for $seconds s"
    rc=0
    "$bin/$t" -max_len=4096 -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        "${dict[@]}" -artifact_prefix="$artifacts/" "$corpus" >"$log" 2>&1 || rc=$?
    grep -E '^Done [0-9]+ runs' "$log" | sed "s/^/  $t: /" || true
    new=$(comm -13 <(echo "$before") <(find "$artifacts" -type f | sort) | sed '/^$/d')
    if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
        failed+=("$t")
        echo "run-briefly: $t FAILED (exit $rc); from fuzz/$log:"
        if grep -q 'panicked at' "$log"; then
            sed -n '/panicked at/,/^stack backtrace:/p' "$log" | head -n 30 | sed 's/^/  | /'
        fi
        grep -v -E '^#[0-9]+|^ +#[0-9]+ |^ +at |^ +[0-9]+: ' "$log" | tail -n 12 | sed 's/^/  | /'
        written=$(sed -n 's/.*Test unit written to //p' "$log")
        for f in $(printf '%s\n' "$new" "$written" | sed '/^$/d' | sort -u); do
            echo "run-briefly: $t input $f ($(wc -c <"$f") bytes), as hex:"
            od -An -tx1 -v "$f"
            echo "  reproduce: cargo +$toolchain fuzz run $t fuzz/$f"
        done
    fi
done

echo "run-briefly: done in $((SECONDS - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
    echo "run-briefly: crashes in: ${failed[*]}"
    exit 1
fi
echo "run-briefly: no crashes"
