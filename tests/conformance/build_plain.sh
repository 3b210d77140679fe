#!/bin/sh
# Build the conformance cases named plain-* with standard tools only:
# printf, zstd, sha256sum, wc, cp. No runfmt code is involved, so these cases check
# that spec.md alone is enough to write a run that runfmt reads.
# Usage: sh tests/conformance/build_plain.sh   (needs zstd >= 1.4)
set -eu
SUITE=$(cd "$(dirname "$0")" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# le32 N: N as 4 little-endian bytes.
le32() {
    for shift in 0 8 16 24; do
        printf "\\$(printf '%03o' $(( ($1 >> shift) & 255 )))"
    done
}

# skippable MAGIC FILE: a skippable frame (spec FRAME-2, FRAME-5) holding FILE's bytes.
skippable() {
    le32 "$1"
    le32 "$(wc -c < "$2")"
    cat "$2"
}

# stage_prefix STAGE SEQ WRITER KEY_FIELD_JSON: the empty zstd frame and the header frame.
stage_prefix() {
    printf '\050\265\057\375\040\000\001\000\000'
    printf '{"format":"runfmt-stage","format_version":"1.0","run_id":"%s","stage":"%s","seq":%d,"writer":"%s","record_schema_version":"1","key_field":%s}' \
        "$RUN_ID" "$1" "$2" "$3" "$4" > "$WORK/header.json"
    skippable $((0x184D2A52)) "$WORK/header.json"
}

# frame FILE [zstd options]: one data frame; zstd reads a file, so it records the content size.
frame() {
    file=$1
    shift
    zstd -q -3 --check "$@" -c "$file"
}

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { wc -c < "$1" | tr -d ' '; }

# ---------------------------------------------------------------- valid/plain-tools-run
CASE="$SUITE/valid/plain-tools-run"
RUN_ID=plain-tools-run
rm -rf "$CASE"
mkdir -p "$CASE/run/_manifests" "$CASE/run/stages/answers" "$CASE/run/artifacts"
cd "$CASE/run"

printf '%s\n' '{"id":"k1:aa","answer":"4","ok":true}' '{"id":"k1:bb","answer":"Lyon","ok":false}' > "$WORK/f1.jsonl"
printf '%s\n' '{"id":"k1:cc","_error":"timeout after 30 s"}' '{"id":"k1:dd","answer":"42","ok":true,"_note":{"x":null}}' > "$WORK/f2.jsonl"
printf 'a comment frame that readers skip' > "$WORK/note.bin"
F=stages/answers/part-000001-sh01.jsonl.zst
{
    stage_prefix answers 1 sh01 '"id"'
    frame "$WORK/f1.jsonl"
    skippable $((0x184D2A5E)) "$WORK/note.bin"
    frame "$WORK/f2.jsonl"
} > "$F"
printf 'accuracy: 2/3\n' > artifacts/summary.txt

CONFIG='{"model":"m0","n":2}'
CONFIG_HASH=k1:$(printf '%s' "$CONFIG" | sha256sum | cut -d' ' -f1)
cat > _manifests/00000002.json <<EOF
{"format": "runfmt", "format_version": "1.0", "required_features": [],
 "run_id": "$RUN_ID", "name": "written with printf and zstd",
 "revision": 2, "status": "completed", "error": null,
 "created_at": "2026-11-02T08:00:00Z", "updated_at": "2026-11-02T08:05:00Z",
 "finished_at": "2026-11-02T08:05:00Z",
 "config": $CONFIG, "config_hash": "$CONFIG_HASH",
 "tags": {"made-by": "build_plain.sh"}, "counters": {"tokens": 17},
 "stages": [
   {"name": "answers", "status": "completed", "record_schema_version": "1", "key_field": "id",
    "files": [{"path": "$F", "bytes": $(size "$F"), "records": 4, "failures": 1,
               "sha256": "$(sha "$F")"}]},
   {"name": "empty", "status": "running", "record_schema_version": "1", "key_field": null,
    "files": []}
 ],
 "artifacts": [{"path": "artifacts/summary.txt", "bytes": $(size artifacts/summary.txt),
                "sha256": "$(sha artifacts/summary.txt)", "media_type": "text/plain"}],
 "made_with": "plain tools, an unknown member readers ignore"}
EOF
cp _manifests/00000002.json manifest.json
sha256sum manifest.json "$F" artifacts/summary.txt | LC_ALL=C sort -k 2 > SHA256SUMS
sha256sum -c --quiet SHA256SUMS
zstd -q -t "$F"

cat > "$CASE/case.json" <<EOF
{
  "description": "A finished run written with printf, zstd and sha256sum only: a hand-formatted manifest with an unknown member, a skippable frame between two data frames, a failure record, an empty stage, SHA256SUMS from sha256sum.",
  "rules": ["FRAME-1", "FRAME-2", "FRAME-3", "FRAME-4", "FRAME-5", "MAN-1", "KEY-1", "KEY-2", "KEY-4", "CHECK-3", "VER-4", "REC-5"],
  "outcome": "valid",
  "built_with": "plain-tools"
}
EOF
cat > "$CASE/expected.json" <<EOF
{
  "run_id": "$RUN_ID",
  "name": "written with printf and zstd",
  "format_version": "1.0",
  "status": "completed",
  "error": null,
  "created_at": "2026-11-02T08:00:00Z",
  "finished_at": "2026-11-02T08:05:00Z",
  "config": $CONFIG,
  "config_hash": "$CONFIG_HASH",
  "tags": {"made-by": "build_plain.sh"},
  "counters": {"tokens": 17},
  "stages": [
    {"name": "answers", "status": "completed", "record_schema_version": "1", "key_field": "id",
     "files": 1, "record_count": 4, "failures": 1, "keys": ["k1:aa", "k1:bb", "k1:dd"],
     "records": [
       {"id": "k1:aa", "answer": "4", "ok": true},
       {"id": "k1:bb", "answer": "Lyon", "ok": false},
       {"id": "k1:cc", "_error": "timeout after 30 s"},
       {"id": "k1:dd", "answer": "42", "ok": true, "_note": {"x": null}}
     ]},
    {"name": "empty", "status": "running", "record_schema_version": "1", "key_field": null,
     "files": 0, "record_count": 0, "failures": 0, "keys": [], "records": []}
  ],
  "artifacts": [{"path": "artifacts/summary.txt", "bytes": $(size artifacts/summary.txt),
                 "sha256": "$(sha artifacts/summary.txt)", "media_type": "text/plain"}]
}
EOF

# ---------------------------------------------------------------- invalid cases
# bad_frame NAME RULE DESCRIPTION FRAME_COMMAND...: a running run whose one file has a bad data frame.
bad_frame() {
    NAME=$1 RULE=$2 DESCRIPTION=$3
    shift 3
    CASE="$SUITE/invalid/$NAME"
    RUN_ID=$NAME
    rm -rf "$CASE"
    mkdir -p "$CASE/run/_manifests" "$CASE/run/stages/answers"
    cd "$CASE/run"
    F=stages/answers/part-000001-sh01.jsonl.zst
    { stage_prefix answers 1 sh01 null; "$@"; } > "$F"
    cat > _manifests/00000001.json <<EOF
{"format": "runfmt", "format_version": "1.0", "required_features": [], "run_id": "$RUN_ID",
 "name": "$NAME", "revision": 1, "status": "running", "error": null,
 "created_at": "2026-11-02T08:00:00Z", "updated_at": "2026-11-02T08:00:00Z", "finished_at": null,
 "config": {}, "config_hash": "k1:$(printf '{}' | sha256sum | cut -d' ' -f1)", "tags": {}, "counters": {},
 "stages": [{"name": "answers", "status": "running", "record_schema_version": "1", "key_field": null,
   "files": [{"path": "$F", "bytes": $(size "$F"), "records": 2, "failures": 0, "sha256": "$(sha "$F")"}]}],
 "artifacts": []}
EOF
    cp _manifests/00000001.json manifest.json
    cat > "$CASE/case.json" <<EOF
{
  "description": "$DESCRIPTION",
  "rules": ["$RULE"],
  "outcome": "invalid",
  "repairable": false,
  "error": "StageFileError",
  "built_with": "plain-tools"
}
EOF
}

printf '%s\n' '{"a":1}' '{"b":2}' > "$WORK/ab.jsonl"
bad_frame plain-frame-no-checksum FRAME-3 \
    "A data frame written with zstd --no-check: it has no content checksum." \
    frame "$WORK/ab.jsonl" --no-check
stdin_frame() { zstd -q -3 --check -c < "$WORK/ab.jsonl"; }
bad_frame plain-frame-no-content-size FRAME-4 \
    "A data frame compressed from a pipe: zstd could not write its content size." \
    stdin_frame

echo "built plain-* cases in $SUITE"
