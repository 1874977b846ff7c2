// The whole marketplace mix, as the goose load test runs it: point reads 70 %, nearby search
// 15 %, gig requests 10 %, write-then-read 5 % of RATE iterations per second (open model).
//   k6 run -e TOKEN=... -e BASE_URL=http://127.0.0.1:8080 -e ADMIN_URL=http://127.0.0.1:9090 loadtest/k6/marketplace.js
import { SharedArray } from 'k6/data';
import * as lib from './lib.js';

// open() resolves relative paths from this script's directory (loadtest/k6/).
const cities = new SharedArray('cities', () => lib.parseCities(open(lib.CITIES_CSV)));

export const options = lib.options(['point_read', 'nearby_search', 'post_gig', 'write_read']);

export function setup() {
  return lib.setupRun(cities, true);
}

export function point_read() {
  lib.pointRead(cities);
}

export function nearby_search() {
  lib.nearbySearch(cities);
}

export function post_gig(run) {
  lib.postGig(run);
}

export function write_read(run) {
  lib.writeRead(run);
}
