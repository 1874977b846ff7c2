// Point read only: the nearest musicians around the user's location snapped to a 0.05 degree
// grid, from cellgate's read cache or the owning shard's replica; the cache_hit rate is the hit
// ratio. Threshold: p99 < 10 ms.
//   k6 run -e TOKEN=... -e BASE_URL=http://127.0.0.1:8080 loadtest/k6/point_read.js
import { SharedArray } from 'k6/data';
import * as lib from './lib.js';

const cities = new SharedArray('cities', () => lib.parseCities(open(lib.CITIES_CSV)));

export const options = lib.options(['point_read']);

export function setup() {
  return lib.setupRun(cities, false);
}

export function point_read() {
  lib.pointRead(cities);
}
