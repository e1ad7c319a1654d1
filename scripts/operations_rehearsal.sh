#!/usr/bin/env bash
# Rehearse docs/operations.md on one machine: provision three hospitals, a registry, a coordinator and two
# admins; run the job service and the four dial-out sites over mutual TLS on 127.0.0.1; drive it with the
# admin console: jobs, a policy refusal, a viewer's refused abort, a site that drops out and comes back, and
# a restart that resumes the running job. Ports 18765, 18443 and 18444 stand for 443, 8443 and 8444.
#
#   bash scripts/operations_rehearsal.sh [FOLDER]     # default: ops-rehearsal/ (removed first)
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$REPO/.venv/bin/python}
D=$(mkdir -p "${1:-ops-rehearsal}" && cd "${1:-ops-rehearsal}" && pwd)
rm -rf "${D:?}"/* && cd "$D" || exit 1
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; pkill -f "$D/startup/.*/worker.toml" 2>/dev/null' EXIT
say() { printf '\n$ %s\n' "$*"; }

cat > project.toml <<'T'
[project]
name = "hospitals"

[coordinator]
id = "coordinator"
hosts = ["127.0.0.1"]
listen = 18765
admin = 18443

[[workers]]
id = "hospital-a"
dial_out = true

[[workers]]
id = "hospital-b"
dial_out = true

[[workers]]
id = "hospital-c"
dial_out = true

[[workers]]
id = "registry"
role = "evaluator"
dial_out = true

[[admins]]
id = "ops@consortium.org"
role = "project-admin"

[[admins]]
id = "audit@hospital-b.org"
role = "viewer"
T
say python -m syncfed provision project.toml -o startup
"$PY" -m syncfed provision project.toml -o startup
cat startup/coordinator/server.toml

serve() {  # the service, from its kit, with the dashboard
    (cd startup/coordinator && exec "$PY" -m syncfed serve --config server.toml --dashboard 127.0.0.1:18444 \
        --dashboard-token-file dashboard.token >> "$D/serve.out" 2>&1) &
    SERVE=$!
    PIDS+=("$SERVE")
}
head -c 24 /dev/urandom | base64 > startup/coordinator/dashboard.token
serve

# The sites: the breast-cancer records as three hospitals' tables and the registry's test set, and each
# hospital's policy.
"$PY" "$REPO/scripts/own_data_demo.py" --out demo-data > /dev/null
for pair in hospital-a:hospital_a hospital-b:hospital_b hospital-c:hospital_c registry:test; do
    id=${pair%%:*}
    printf 'data = "csv:%s"\nlabel-column = "diagnosis"\n' "$D/demo-data/breast_cancer/${pair##*:}.csv" \
        >> "startup/$id/worker.toml"
done
for id in hospital-a hospital-b hospital-c; do
    cat > "startup/$id/site-policy.toml" <<'T'
coordinators = ["coordinator"]
min_other_sites = 1

[training]
max_rounds = 100
require_secure_agg = true

[analytics]
queries = ["label-histogram"]
T
    echo 'policy = "site-policy.toml"' >> "startup/$id/worker.toml"
done
cat startup/hospital-a/worker.toml
site() {  # one site's worker, from its kit
    (cd "startup/$1" && exec "$PY" "$REPO/run_websocket_server.py" --config worker.toml >> "$D/$1.out" 2>&1) &
    PIDS+=($!)
    eval "SITE_${1//-/_}=$!"
}
for id in hospital-a hospital-b hospital-c registry; do site "$id"; done

ADMIN=("$PY" -m syncfed admin --config startup/ops@consortium.org/admin.toml)
VIEWER=("$PY" -m syncfed admin --config startup/audit@hospital-b.org/admin.toml)
connected() { [ "$("${ADMIN[@]}" workers --json 2>/dev/null | grep -c '"connected": true')" = "$1" ]; }
for _ in $(seq 120); do connected 4 && break; sleep 1; done

cat > job.toml <<'T'
name = "cancer-fedavg"
workers = ["hospital-a", "hospital-b", "hospital-c"]
evaluator = "registry"
training-rounds = 20
eval-every = 5
secure-agg = true
T
say python -m syncfed admin --config admin.toml workers; "${ADMIN[@]}" workers
say python -m syncfed admin --config admin.toml submit job.toml; "${ADMIN[@]}" submit job.toml
sleep 1
say python -m syncfed admin --config admin.toml jobs; "${ADMIN[@]}" jobs
say "python -m syncfed admin --config admin.toml abort 1   # the viewer's kit"; "${VIEWER[@]}" abort 1
say python -m syncfed admin --config admin.toml logs 1 --follow; timeout 300 "${ADMIN[@]}" logs 1 --follow
say python -m syncfed admin --config admin.toml status 1; "${ADMIN[@]}" status 1
say python -m syncfed admin --config admin.toml metrics 1; "${ADMIN[@]}" metrics 1
say python -m syncfed admin --config admin.toml download 1 -o model.safetensors
"${ADMIN[@]}" download 1 -o model.safetensors

sed 's/cancer-fedavg/quick-look/; /secure-agg/d; s/training-rounds = 20/training-rounds = 5/' job.toml > quick.toml
say python -m syncfed admin --config admin.toml submit quick.toml; "${ADMIN[@]}" submit quick.toml
for _ in $(seq 60); do "${ADMIN[@]}" status 2 | grep -q "^state  *failed" && break; sleep 1; done
say python -m syncfed admin --config admin.toml status 2; "${ADMIN[@]}" status 2
say curl https://127.0.0.1:18444/api/state   # no certificate, no token
curl -sk -o /dev/null -w "%{http_code}\n" https://127.0.0.1:18444/api/state

# A site drops out mid-job and comes back; then the service restarts under a running job.
printf 'name = "site-down"\nworkers = ["hospital-a", "hospital-b", "hospital-c"]\nevaluator = "registry"\n' > down.toml
printf 'training-rounds = 100\neval-every = 25\nsecure-agg = true\nmin-workers = 2\nlocal-epochs = 150\n' >> down.toml
say python -m syncfed admin --config admin.toml submit down.toml; "${ADMIN[@]}" submit down.toml
sleep 3
kill "$SITE_hospital_c"; echo "(hospital-c stopped)"
sleep 2
site hospital-c; echo "(hospital-c started again)"
timeout 300 "${ADMIN[@]}" logs 3 --follow > down.log
for _ in $(seq 120); do connected 4 && break; sleep 1; done
say "python -m syncfed admin --config admin.toml logs 3 | grep -v 'summed'"
grep -v "summed\|Model update\|Federated model: \(AUC\|Recall\)" down.log
sed 's/site-down/restart/' down.toml > restart.toml
say python -m syncfed admin --config admin.toml submit restart.toml; "${ADMIN[@]}" submit restart.toml
sleep 4
say "kill -TERM <serve>; python -m syncfed serve ... (again)"
kill -TERM "$SERVE"; wait "$SERVE"
serve
for _ in $(seq 120); do "${ADMIN[@]}" jobs > /dev/null 2>&1 && break; sleep 1; done
timeout 300 "${ADMIN[@]}" logs 4 --follow > restart.log 2>&1
say "python -m syncfed admin --config admin.toml logs 4 | grep -v 'summed'"
grep -v "summed\|Model update\|Federated model: \(AUC\|Recall\)" restart.log
say python -m syncfed admin --config admin.toml jobs; "${ADMIN[@]}" jobs
kill -TERM "$SERVE"; wait "$SERVE"
printf '\n--- the service\n'; cat serve.out
printf '\n--- hospital-c\n'; grep -v "INFO" hospital-c.out
printf '\n--- the audit log\n'; cat startup/coordinator/state/audit.jsonl
