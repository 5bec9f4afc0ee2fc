#!/usr/bin/env bash
# End-to-end checks of the moeserve binary's commands: serve starts and exits 0 on SIGTERM and
# SIGINT; verify passes on the golden checkpoint and fails (exit 1) on other weights of the same
# shape; write-checkpoint output loads.
set -u
MOESERVE="$1"
DATA="$2"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
failures=0
check() {  # check NAME EXPECTED_RC ACTUAL_RC
  if [ "$2" -eq "$3" ]; then echo "ok: $1"; else echo "FAIL: $1 (exit $3, expected $2)"; failures=$((failures + 1)); fi
}

# serve: starts on the demo model, says so loudly, stops cleanly on each signal.
for sig in TERM INT; do
  "$MOESERVE" serve --port 0 --metrics_port 0 >"$TMP/serve.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 100); do grep -q "ready: health SERVING" "$TMP/serve.log" && break; sleep 0.1; done
  grep -q "RANDOM-WEIGHT DEMO" "$TMP/serve.log"; check "serve warns about the demo model" 0 $?
  kill -s "$sig" "$pid"
  wait "$pid"; check "serve exits 0 on SIG$sig" 0 $?
  grep -q "drained; exiting" "$TMP/serve.log"; check "serve drains on SIG$sig" 0 $?
done

# generate: text and statistics offline; bad options are usage errors that name the flag.
"$MOESERVE" generate --prompt "Hello" --max_new_tokens 16 --block_length 8 --json >"$TMP/gen.json" 2>"$TMP/gen.log"
check "generate on the demo model" 0 $?
python3 -c "
import json, sys
j = json.load(open('$TMP/gen.json'))
assert 0 < j['completion_tokens'] <= 16 and j['forwards'] > 0 and j['tokens_per_forward'] > 0, j
assert j['prompt_tokens'] == 5, j
"; check "generate prints ids, counts, tokens per forward" 0 $?
"$MOESERVE" generate --prompt "Hello" --max_new_tokens 16 --routing expert_choice --capacity_factor 1.0 --policy scheduled \
  --chat >/dev/null 2>"$TMP/gen.log"
check "generate with expert-choice, scheduled policy, chat template" 0 $?
grep -q "tokens per forward" "$TMP/gen.log"; check "generate reports tokens per forward" 0 $?
bad_generate() {  # bad_generate NAME EXPECTED_TEXT ARGS...
  local name="$1" expect="$2"
  shift 2
  "$MOESERVE" generate "$@" >/dev/null 2>"$TMP/bad.log"
  check "generate rejects $name" 2 $?
  grep -q -- "$expect" "$TMP/bad.log"; check "the error names $expect" 0 $?
}
bad_generate "an empty prompt" "--prompt" --prompt ""
bad_generate "invalid UTF-8" "UTF-8" --prompt "$(printf 'ab\xffcd')"
bad_generate "max_new_tokens 0" "--max_new_tokens" --prompt hi --max_new_tokens 0
bad_generate "max_new_tokens over the limit" "--max_new_tokens" --prompt hi --max_new_tokens 1000000
bad_generate "a prompt over the context" "context limit" --prompt hi --max_new_tokens 5000
bad_generate "block_length 0" "--block_length" --prompt hi --block_length 0
bad_generate "block_length over the limit" "--block_length" --prompt hi --block_length 100000
bad_generate "threshold 1.5" "--threshold" --prompt hi --threshold 1.5
bad_generate "an unknown policy" "--policy" --prompt hi --policy greedy

# tokenize: JSON lines both ways, with the demo tokenizer and with a tokenizer.json.
out=$(printf '{"text": "h\u00e9<|mask|>"}\n' | "$MOESERVE" tokenize)
[ "$out" = '{"ids":[104,195,169,257]}' ]; check "tokenize with the demo tokenizer (got $out)" 0 $?
out=$(printf '{"ids": [104,195,169,257]}\n' | "$MOESERVE" tokenize --decode)
[ "$out" = '{"text":"hé<|mask|>"}' ]; check "tokenize --decode (got $out)" 0 $?
python3 -c "
import json
for line in open('$DATA/tokenizer/cases.jsonl'):
    print(json.dumps({'text': json.loads(line)['text']}))
" >"$TMP/texts.jsonl"
"$MOESERVE" tokenize --tokenizer "$DATA/tokenizer/tokenizer.json" <"$TMP/texts.jsonl" >"$TMP/ids.jsonl"
check "tokenize every golden text" 0 $?
python3 -c "
import json
want = [json.loads(l)['ids'] for l in open('$DATA/tokenizer/cases.jsonl')]
got = [json.loads(l)['ids'] for l in open('$TMP/ids.jsonl')]
assert want == got, 'ids differ'
"; check "tokenize output equals the Hugging Face ids" 0 $?
printf 'not json\n' | "$MOESERVE" tokenize >/dev/null 2>&1
check "tokenize rejects a bad line" 2 $?

"$MOESERVE" verify --model_dir "$DATA/llada2-tiny" --golden_dir "$DATA/llada2-tiny" >"$TMP/verify.log" 2>&1
check "verify passes on the golden checkpoint" 0 $?
grep -q "^PASS" "$TMP/verify.log"; check "verify prints PASS" 0 $?

"$MOESERVE" write-checkpoint --config "$DATA/llada2-tiny/config.json" --out_dir "$TMP/random" --shards 2 --seed 9 \
  >"$TMP/write.log" 2>&1
check "write-checkpoint writes a sharded checkpoint" 0 $?
"$MOESERVE" verify --model_dir "$TMP/random" --golden_dir "$DATA/llada2-tiny" >"$TMP/verify2.log" 2>&1
check "verify fails on other weights" 1 $?
grep -q "^FAIL" "$TMP/verify2.log"; check "verify prints FAIL" 0 $?

"$MOESERVE" verify --model_dir "$TMP/nonexistent" --golden_dir "$DATA/llada2-tiny" >/dev/null 2>&1
check "verify fails on a missing checkpoint" 1 $?
# route-stats on the shipped LLaDA2.0-mini config with random routers: expert-choice is perfectly
# balanced (max/mean exactly 1) in both scopes, token-choice is not.
MINI="$(dirname "$0")/../../model/configs/LLaDA2.0-mini-preview.json"
summary() {  # summary FIELD: reads route-stats JSON on stdin
  python3 -c "import json,sys; print(json.load(sys.stdin)['summary']['$1'])"
}
for scope in request batch; do
  worst=$("$MOESERVE" route-stats --config "$MINI" --tokens 256 --sequences 8 --routing expert_choice \
    --scope "$scope" --capacity_factor 1.25 --json | summary worst_max_over_mean)
  [ "$worst" = "1.0" ]; check "route-stats expert_choice $scope scope max/mean = 1 (got $worst)" 0 $?
  best=$("$MOESERVE" route-stats --config "$MINI" --tokens 256 --sequences 8 --routing token_choice \
    --scope "$scope" --json | python3 -c "import json,sys; print(min(l['max_over_mean'] for l in json.load(sys.stdin)['layers']))")
  python3 -c "import sys; sys.exit(0 if $best > 1 else 1)"; check "route-stats token_choice $scope scope max/mean > 1 (got $best)" 0 $?
done
"$MOESERVE" route-stats --config "$MINI" --routing expert_choice --capacity_factor nan >"$TMP/rs.log" 2>&1
check "route-stats rejects a NaN capacity factor" 2 $?
grep -q "capacity_factor" "$TMP/rs.log"; check "the error names capacity_factor" 0 $?
"$MOESERVE" route-stats --config "$MINI" --routing top_k >"$TMP/rs.log" 2>&1
check "route-stats rejects an unknown mode" 2 $?
grep -q -- "--routing" "$TMP/rs.log"; check "the error names --routing" 0 $?
"$MOESERVE" route-stats --model_dir "$TMP/random" --tokens 64 --routing expert_choice >/dev/null 2>&1
check "route-stats reads a checkpoint's routers" 0 $?

"$MOESERVE" bogus-command >/dev/null 2>&1
check "unknown command is a usage error" 2 $?

[ "$failures" -eq 0 ]
