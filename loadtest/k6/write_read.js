// Write-then-read only: an INSERT, then a read of the same row with its read-your-writes token
// (consistency {"after": token, "wait_ms": 500}); a read without the row fails the checks.
//   k6 run -e TOKEN=... -e BASE_URL=http://127.0.0.1:8080 -e ADMIN_URL=http://127.0.0.1:9090 loadtest/k6/write_read.js
import { SharedArray } from 'k6/data';
import * as lib from './lib.js';

const cities = new SharedArray('cities', () => lib.parseCities(open(lib.CITIES_CSV)));

export const options = lib.options(['write_read']);

export function setup() {
  return lib.setupRun(cities, true);
}

export function write_read(run) {
  lib.writeRead(run);
}
