// Gig requests only: INSERTs on the primary of the shard owning the gig's point. setup()
// resolves the write points' h3 through GET /admin/locate (ADMIN_URL, ADMIN_TOKEN or TOKEN).
//   k6 run -e TOKEN=... -e BASE_URL=http://127.0.0.1:8080 -e ADMIN_URL=http://127.0.0.1:9090 loadtest/k6/post_gig.js
import { SharedArray } from 'k6/data';
import * as lib from './lib.js';

const cities = new SharedArray('cities', () => lib.parseCities(open(lib.CITIES_CSV)));

export const options = lib.options(['post_gig']);

export function setup() {
  return lib.setupRun(cities, true);
}

export function post_gig(run) {
  lib.postGig(run);
}
