#!/usr/bin/env bash
# Checks the k6 scripts without k6: every script must parse as an ES module (`node --check`;
# imports such as 'k6/http' are not resolved, on purpose), then the pure helpers of lib.js run
# under node with the k6 modules stubbed: CSV parsing on the real cities file, the weighted
# city choice and the hex -> decimal conversion of H3 indexes.
# Usage: bash loadtest/k6/check.sh   (needs node >= 18)
set -euo pipefail
cd "$(dirname "$0")"

fail=0
for f in *.js; do
  if node --input-type=module --check < "$f"; then
    echo "ok     $f"
  else
    echo "FAILED $f (syntax)"
    fail=1
  fi
done
[ "$fail" = 0 ] || exit 1

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cat > "$TMP/env.mjs" <<'JS'
globalThis.__ENV = {};
JS
cat > "$TMP/k6-http.mjs" <<'JS'
export default { setResponseCallback() {}, expectedStatuses() {} };
JS
cat > "$TMP/k6-execution.mjs" <<'JS'
export default { scenario: { iterationInTest: 0 } };
JS
cat > "$TMP/k6.mjs" <<'JS'
export function check() { return true; }
JS
cat > "$TMP/k6-metrics.mjs" <<'JS'
export class Rate { add() {} }
export class Counter { add() {} }
JS
sed -e "s#from 'k6/http'#from './k6-http.mjs'#" -e "s#from 'k6/execution'#from './k6-execution.mjs'#" \
  -e "s#from 'k6/metrics'#from './k6-metrics.mjs'#" -e "s#from 'k6'#from './k6.mjs'#" lib.js > "$TMP/lib.mjs"
cat > "$TMP/test.mjs" <<JS
import './env.mjs';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import * as lib from './lib.mjs';

// Same filter as the goose test (loadtest/src/world.rs): positive population, valid point.
const cities = lib.parseCities(readFileSync('$PWD/../../tests/data/cities15000.csv', 'utf8'));
assert.ok(cities.length > 30000, 'cities parsed: ' + cities.length);
assert.ok(cities.every((c, i) => i === 0 || c[0] > cities[i - 1][0]), 'cumulative sums increase');
assert.ok(cities.some((c) => c[3].includes(',')), 'quoted names with commas survive');
// Hot metros are hot: the 100 biggest cities draw far more than 100 / n of the picks.
let hits = 0;
const byPop = cities.map((c, i) => [c[0] - (i ? cities[i - 1][0] : 0), c[3]]).sort((a, b) => b[0] - a[0]);
const big = new Set(byPop.slice(0, 100).map((c) => c[1]));
for (let i = 0; i < 20000; i++) if (big.has(lib.pickCity(cities)[3])) hits++;
assert.ok(hits / 20000 > 0.15, 'top-100 share ' + hits / 20000);
// H3 indexes: hex -> exact decimal string.
for (const hex of ['8f2830828052d25', '8001fffffffffff', '0', 'ff']) {
  assert.equal(lib.hexToDecimal(hex), BigInt('0x' + hex).toString());
}
// Point reads: snapped to the 0.05 degree grid like the goose test's (loadtest/src/world.rs).
assert.deepEqual(lib.snap(40.4168, -3.7038, 0.05), [40.4, -3.7]);
assert.deepEqual(lib.snap(40.4312, -3.6751, 0.05), [40.45, -3.7]);
assert.deepEqual(lib.snap(-33.8688, 151.2093, 0.05), [-33.85, 151.2]);
assert.deepEqual(lib.snap(89.99, 179.99, 0.05), [89.9, 180]);
// Cache-Status (RFC 9211) of the read cache, docs/cache.md.
assert.equal(lib.cacheOutcome('cellgate; hit; ttl=12'), 'hit');
assert.equal(lib.cacheOutcome('cellgate; hit; ttl=12; detail=l2'), 'hit');
assert.equal(lib.cacheOutcome('cellgate; fwd=miss; stored; ttl=30'), 'miss');
assert.equal(lib.cacheOutcome('cellgate; fwd=miss; collapsed'), 'miss');
assert.equal(lib.cacheOutcome('cellgate; fwd=request; stored; ttl=30'), 'miss');
assert.equal(lib.cacheOutcome('cellgate; fwd=bypass; detail=redis-down'), 'bypass');
assert.equal(lib.cacheOutcome('edge; fwd=uri-miss, cellgate;hit;ttl=5'), 'hit');
assert.equal(lib.cacheOutcome(undefined), 'none');
assert.equal(lib.cacheOutcome('edge; hit'), 'none');
// Scenario weights and options.
assert.deepEqual(Object.values(lib.SCENARIOS).map((s) => s.weight), [70, 15, 10, 5]);
const all = lib.options(['point_read', 'nearby_search', 'post_gig', 'write_read']);
assert.deepEqual(Object.values(all.scenarios).map((s) => s.rate), [70, 15, 10, 5]);
assert.deepEqual(all.thresholds.http_req_failed, ['rate==0']);
assert.deepEqual(all.thresholds['http_req_duration{scenario:point_read}'], ['p(99)<10']);
assert.deepEqual(all.thresholds['http_req_duration{scenario:nearby_search}'], ['p(99)<20']);
assert.equal(lib.options(['point_read']).scenarios.point_read.rate, 100);
console.log('ok     lib.js helpers (' + cities.length + ' cities)');
JS
node "$TMP/test.mjs"
