// Shared code of the k6 scripts: the same four marketplace scenarios as the goose load test
// (loadtest/src/scenarios.rs), with the same SQL, weights, ids and failure rules.
//
// Environment (k6 run -e NAME=value):
//   BASE_URL     data plane, loopback only          [http://127.0.0.1:8080]
//   ADMIN_URL    admin plane, loopback only          [http://127.0.0.1:9090]
//   TOKEN        bearer token, scopes read + write   (required; CELLGATE_TOKEN is read too)
//   ADMIN_TOKEN  token with the admin scope, used once in setup() to resolve the h3 of the
//                write points                         [TOKEN]
//   RATE         iterations per second of the whole mix (open model)  [100]
//   DURATION     how long each scenario runs          [30s]
//   VUS          pre-allocated VUs per scenario       [10]; at most 10x that
//   WRITE_POINTS write locations resolved in setup()  [200]
//   CITIES       cities CSV, relative to loadtest/k6/ [../../tests/data/cities15000.csv]

import http from 'k6/http';
import exec from 'k6/execution';
import { check } from 'k6';
import { Counter, Rate } from 'k6/metrics';

export const SCENARIOS = {
  point_read: { weight: 70 },
  nearby_search: { weight: 15 },
  post_gig: { weight: 10 },
  write_read: { weight: 5 },
};

const QUERY = '/v1/sql/core/query';
const EXECUTE = '/v1/sql/core/execute';
const USER_JITTER_KM = 5;
const POINT_READ_KM = 10;
const POINT_READ_LIMIT = 10;
// The point read is snapped to this grid (degrees) so that neighbours send the same read and
// share its cache entry, and asks cellgate's read cache for its answer for this long.
const POINT_READ_GRID_DEG = 0.05;
const POINT_READ_CACHE_TTL_MS = 30000;
const NEARBY_RADIUS_KM = 25;
const NEARBY_LIMIT = 20;
const RYW_WAIT_MS = 500;
const DEMO_VENUES = 5000;
const KM_PER_DEGREE_LAT = 111.195;
// Ids: (run start in seconds since 2023-11-14) * 2^23 + a per-run counter, below 2^53, far
// above the demo's 1..=10000; post_gig takes the even counters, write_read the odd ones.
const ID_EPOCH_SECS = 1700000000;
const ID_COUNTER = 8388608; // 2^23

export const CITIES_CSV = __ENV.CITIES || '../../tests/data/cities15000.csv';

function loopback(url) {
  return /^https?:\/\/(localhost|127\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[::1\])(:\d+)?(\/|$)/i.test(url);
}

function target(name, fallback) {
  const url = (__ENV[name] || fallback).replace(/\/+$/, '');
  if (!loopback(url)) {
    throw new Error(`${name}=${url}: load tests may only target loopback addresses`);
  }
  return url;
}

export const BASE_URL = target('BASE_URL', 'http://127.0.0.1:8080');
export const ADMIN_URL = target('ADMIN_URL', 'http://127.0.0.1:9090');
const TOKEN = __ENV.TOKEN || __ENV.CELLGATE_TOKEN || '';
const ADMIN_TOKEN = __ENV.ADMIN_TOKEN || TOKEN;
const RATE = Number(__ENV.RATE || 100);
const DURATION = __ENV.DURATION || '30s';
const VUS = Number(__ENV.VUS || 10);
const WRITE_POINTS = Number(__ENV.WRITE_POINTS || 200);

// Only a 200 is a success (http_req_failed counts everything else).
http.setResponseCallback(http.expectedStatuses(200));

// ---------------------------------------------------------------------------------------------
// Cities, weighted by population

/** Split one CSV line (quoted fields may hold commas and doubled quotes). */
function csvFields(line) {
  const out = [];
  let field = '';
  let quoted = false;
  for (let i = 0; i < line.length; i++) {
    const c = line[i];
    if (quoted) {
      if (c === '"' && line[i + 1] === '"') {
        field += '"';
        i++;
      } else if (c === '"') {
        quoted = false;
      } else {
        field += c;
      }
    } else if (c === '"') {
      quoted = true;
    } else if (c === ',') {
      out.push(field);
      field = '';
    } else {
      field += c;
    }
  }
  out.push(field);
  return out;
}

/**
 * Parse `geonameid,name,country,lat,lng,population` (CRLF fine) into
 * `[cumulative population, lat, lng, name]` rows: for a SharedArray in the init context.
 */
export function parseCities(text) {
  const lines = text.split(/\r?\n/).filter((l) => l.length > 0);
  const header = csvFields(lines[0]);
  const col = (name) => {
    const i = header.indexOf(name);
    if (i < 0) throw new Error(`cities CSV: no column ${name}`);
    return i;
  };
  const [iName, iLat, iLng, iPop] = [col('name'), col('lat'), col('lng'), col('population')];
  const rows = [];
  let total = 0;
  for (let n = 1; n < lines.length; n++) {
    const f = csvFields(lines[n]);
    const lat = Number(f[iLat]);
    const lng = Number(f[iLng]);
    const pop = Number(f[iPop]);
    if (!(pop > 0) || !(Math.abs(lat) <= 90) || !(Math.abs(lng) <= 180)) continue;
    total += pop;
    rows.push([total, lat, lng, f[iName]]);
  }
  if (rows.length === 0) throw new Error('cities CSV: no city with a valid location and population');
  return rows;
}

/** A city drawn with probability population / total: binary search on the cumulative sums. */
export function pickCity(cities) {
  const total = cities[cities.length - 1][0];
  const r = Math.floor(Math.random() * total);
  let lo = 0;
  let hi = cities.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (cities[mid][0] <= r) lo = mid + 1;
    else hi = mid;
  }
  return cities[lo];
}

function round6(v) {
  return Math.round(v * 1e6) / 1e6;
}

/** A point uniformly within ±km of (lat, lng), valid and rounded like the goose test's. */
function jitter(lat, lng, km) {
  const dlat = km / KM_PER_DEGREE_LAT;
  const dlng = Math.min(dlat / Math.max(Math.cos((lat * Math.PI) / 180), 0.01), 180);
  const la = Math.min(Math.max(lat + (Math.random() * 2 - 1) * dlat, -89.9), 89.9);
  let ln = lng + (Math.random() * 2 - 1) * dlng;
  if (ln > 180) ln -= 360;
  else if (ln < -180) ln += 360;
  return [round6(la), Math.min(Math.max(round6(ln), -180), 180)];
}

/** (lat, lng) snapped to the nearest node of a `grid`-degree grid, as the goose test does. */
export function snap(lat, lng, grid) {
  const node = (v) => round6(Math.round(v / grid) * grid);
  return [Math.min(Math.max(node(lat), -89.9), 89.9), Math.min(Math.max(node(lng), -180), 180)];
}

function userLocation(cities) {
  const c = pickCity(cities);
  return jitter(c[1], c[2], USER_JITTER_KM);
}

function bbox(lat, lng, km) {
  const dlat = km / KM_PER_DEGREE_LAT;
  const dlng = Math.min(dlat / Math.max(Math.cos((lat * Math.PI) / 180), 0.01), 180);
  return [Math.max(lat - dlat, -90), Math.min(lat + dlat, 90), Math.max(lng - dlng, -180), Math.min(lng + dlng, 180)];
}

/** A hex H3 index as a decimal string (exact: no BigInt or doubles needed). */
export function hexToDecimal(hex) {
  let digits = [0]; // little-endian base 10
  for (const h of hex) {
    let carry = parseInt(h, 16);
    if (Number.isNaN(carry)) throw new Error(`not hex: ${hex}`);
    for (let i = 0; i < digits.length; i++) {
      const v = digits[i] * 16 + carry;
      digits[i] = v % 10;
      carry = Math.floor(v / 10);
    }
    while (carry > 0) {
      digits.push(carry % 10);
      carry = Math.floor(carry / 10);
    }
  }
  return digits.reverse().join('');
}

// ---------------------------------------------------------------------------------------------
// Options

/** k6 scenarios for `names`, each a constant arrival rate at its weighted share of RATE. */
export function options(names) {
  const scenarios = {};
  const thresholds = {
    http_req_failed: ['rate==0'],
    checks: ['rate==1'],
  };
  // Each scenario's share of RATE among the scenarios run (a single-scenario script gets it all).
  const weights = names.reduce((sum, name) => sum + SCENARIOS[name].weight, 0);
  for (const name of names) {
    scenarios[name] = {
      executor: 'constant-arrival-rate',
      exec: name,
      rate: Math.max(1, Math.round((RATE * SCENARIOS[name].weight) / weights)),
      timeUnit: '1s',
      duration: DURATION,
      preAllocatedVUs: VUS,
      maxVUs: VUS * 10,
    };
  }
  // p99 targets; the writes get a threshold that always passes so that k6 prints their
  // per-scenario latency too.
  const p99 = { point_read: 'p(99)<10', nearby_search: 'p(99)<20', post_gig: 'p(99)>=0', write_read: 'p(99)>=0' };
  for (const name of names) {
    thresholds[`http_req_duration{scenario:${name}}`] = [p99[name]];
  }
  return { scenarios, thresholds, setupTimeout: '60s', summaryTrendStats: ['avg', 'p(50)', 'p(90)', 'p(99)', 'max'] };
}

// ---------------------------------------------------------------------------------------------
// Setup: run id and write points (the h3 column needs the point's resolution-15 cell, which
// cellgate computes: GET /admin/locate returns it as point_cell)

export function setupRun(cities, withWrites) {
  if (!TOKEN) throw new Error('set TOKEN (k6 run -e TOKEN=...) to a token with read and write scopes');
  const run = { idBase: (Math.floor(Date.now() / 1000) - ID_EPOCH_SECS) * ID_COUNTER, points: [] };
  if (!withWrites) return run;
  for (let i = 0; i < WRITE_POINTS; i++) {
    const city = pickCity(cities);
    const [lat, lng] = jitter(city[1], city[2], USER_JITTER_KM);
    const res = http.get(`${ADMIN_URL}/admin/locate?lat=${lat}&lng=${lng}`, {
      headers: { authorization: `Bearer ${ADMIN_TOKEN}` },
      tags: { name: 'setup:locate' },
    });
    if (res.status !== 200) {
      throw new Error(`GET /admin/locate: ${res.status} ${res.body} (ADMIN_TOKEN needs the admin scope)`);
    }
    run.points.push({ lat, lng, h3: hexToDecimal(res.json('point_cell')), city: city[3] });
  }
  return run;
}

// ---------------------------------------------------------------------------------------------
// Requests

// The read cache's answers to the point reads (Cache-Status, RFC 9211, cache name `cellgate`):
// `cache_hit` is the hit ratio over every successful cached-eligible read (k6 prints it as a
// rate); the counters split the rest.
const cacheHit = new Rate('cache_hit');
const cacheMiss = new Counter('cache_miss');
const cacheBypass = new Counter('cache_bypass');
const cacheNoHeader = new Counter('cache_no_header');

/** 'hit', 'miss', 'bypass' or 'none': the `cellgate` member of a Cache-Status value. */
export function cacheOutcome(header) {
  const member = String(header || '')
    .split(',')
    .map((m) => m.split(';').map((p) => p.trim()))
    .find((m) => m[0] === 'cellgate' || m[0] === '"cellgate"');
  if (!member) return 'none';
  if (member.includes('hit')) return 'hit';
  const fwd = member.find((p) => p.startsWith('fwd='));
  if (!fwd) return 'none';
  return fwd === 'fwd=bypass' ? 'bypass' : 'miss';
}

function countCache(res) {
  const outcome = cacheOutcome(res.headers['Cache-Status']);
  cacheHit.add(outcome === 'hit');
  if (outcome === 'miss') cacheMiss.add(1);
  if (outcome === 'bypass') cacheBypass.add(1);
  if (outcome === 'none') cacheNoHeader.add(1);
}

function post(path, body, name, onSuccess) {
  const res = http.post(`${BASE_URL}${path}`, JSON.stringify(body), {
    headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' },
    tags: { name },
  });
  let json = null;
  try {
    json = res.json();
  } catch (_) {
    json = null;
  }
  check(res, {
    [`${name}: status 200`]: (r) => r.status === 200,
    [`${name}: JSON without error`]: () => json !== null && typeof json === 'object' && !('error' in json),
  });
  const ok = json && !('error' in json) && res.status === 200;
  if (ok && onSuccess) onSuccess(res);
  return ok ? json : null;
}

function rowsCheck(name, json, limit) {
  check(json, { [`${name}: rows`]: (j) => j !== null && Array.isArray(j.rows) && j.rows.length <= limit });
}

const SAME_ID = (value, id) => value === id || value === String(id);

export function pointRead(cities) {
  const [lat, lng] = snap(...userLocation(cities), POINT_READ_GRID_DEG);
  const [latLo, latHi, lngLo, lngHi] = bbox(lat, lng, POINT_READ_KM);
  const json = post(
    QUERY,
    {
      region: { lat, lng },
      sql:
        'SELECT id, name, instrument, rating, hourly_rate_cents, ' +
        '(lat - $1::float8)^2 + (lng - $2::float8)^2 AS dist FROM musicians ' +
        'WHERE lat BETWEEN $3::float8 AND $4::float8 AND lng BETWEEN $5::float8 AND $6::float8 ' +
        'ORDER BY dist LIMIT $7::int4',
      params: [lat, lng, latLo, latHi, lngLo, lngHi, POINT_READ_LIMIT],
      cache: { ttl_ms: POINT_READ_CACHE_TTL_MS },
    },
    'point_read',
    countCache,
  );
  rowsCheck('point_read', json, POINT_READ_LIMIT);
}

export function nearbySearch(cities) {
  const [lat, lng] = userLocation(cities);
  const [latLo, latHi, lngLo, lngHi] = bbox(lat, lng, NEARBY_RADIUS_KM);
  const json = post(
    QUERY,
    {
      region: { lat, lng, radius_km: NEARBY_RADIUS_KM },
      sql:
        'SELECT id, name, instrument, city, lat, lng, ' +
        '(lat - $1::float8)^2 + (lng - $2::float8)^2 AS dist FROM musicians ' +
        'WHERE lat BETWEEN $3::float8 AND $4::float8 AND lng BETWEEN $5::float8 AND $6::float8 ' +
        'ORDER BY dist LIMIT $7::int4',
      params: [lat, lng, latLo, latHi, lngLo, lngHi, NEARBY_LIMIT],
      merge: { order_by: [{ column: 'dist' }], limit: NEARBY_LIMIT },
    },
    'nearby_search',
  );
  rowsCheck('nearby_search', json, NEARBY_LIMIT);
}

const TITLES = ['Jazz night', 'Wedding band', 'Open mic host', 'String quartet', 'DJ set', 'Choir'];
const GENRES = ['jazz', 'rock', 'pop', 'classical', 'folk', 'electronic', 'latin', 'blues'];
const pick = (items) => items[Math.floor(Math.random() * items.length)];
const pad2 = (n) => String(n).padStart(2, '0');

function gigInsert(run, parity) {
  const counter = 2 * exec.scenario.iterationInTest + parity;
  if (counter >= ID_COUNTER) throw new Error('all 2^23 gig request ids of this run are used');
  const id = run.idBase + counter;
  const p = run.points[Math.floor(Math.random() * run.points.length)];
  const month = 1 + Math.floor(Math.random() * 12);
  const day = 1 + Math.floor(Math.random() * 28);
  const body = {
    region: { lat: p.lat, lng: p.lng },
    sql:
      'INSERT INTO gig_requests (id, venue_id, title, genre, budget_cents, gig_date, lat, lng, h3) ' +
      'VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id',
    params: [
      id,
      1 + Math.floor(Math.random() * DEMO_VENUES),
      `${pick(TITLES)} in ${p.city}`,
      pick(GENRES),
      10000 + 500 * Math.floor(Math.random() * 400),
      `2027-${pad2(month)}-${pad2(day)}`,
      p.lat,
      p.lng,
      p.h3, // decimal string: int8 accepts it, and it is exact
    ],
  };
  return { id, body };
}

function insertCheck(name, json, id) {
  check(json, {
    [`${name}: inserted`]: (j) =>
      j !== null && j.rows_affected === 1 && Array.isArray(j.rows) && j.rows.length === 1 && SAME_ID(j.rows[0].id, id),
  });
}

export function postGig(run) {
  const { id, body } = gigInsert(run, 0);
  insertCheck('post_gig', post(EXECUTE, body, 'post_gig'), id);
}

export function writeRead(run) {
  const { id, body } = gigInsert(run, 1);
  const written = post(EXECUTE, body, 'write_read:execute');
  insertCheck('write_read:execute', written, id);
  const token = written && written.token;
  check(token, { 'write_read: read-your-writes token': (t) => typeof t === 'string' && t.length > 0 });
  if (!token) return;
  const read = post(
    QUERY,
    {
      region: body.region,
      sql: 'SELECT id, title FROM gig_requests WHERE id = $1',
      params: [id],
      consistency: { after: token, wait_ms: RYW_WAIT_MS },
    },
    'write_read:query',
  );
  check(read, {
    'write_read: row visible after its token': (j) => j !== null && Array.isArray(j.rows) && j.rows.some((r) => SAME_ID(r.id, id)),
  });
}
