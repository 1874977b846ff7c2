// Nearby search only: the 20 nearest musicians within 25 km, an area read merged over the
// owning shards by distance. Threshold: p99 < 20 ms.
//   k6 run -e TOKEN=... -e BASE_URL=http://127.0.0.1:8080 loadtest/k6/nearby_search.js
import { SharedArray } from 'k6/data';
import * as lib from './lib.js';

const cities = new SharedArray('cities', () => lib.parseCities(open(lib.CITIES_CSV)));

export const options = lib.options(['nearby_search']);

export function setup() {
  return lib.setupRun(cities, false);
}

export function nearby_search() {
  lib.nearbySearch(cities);
}
