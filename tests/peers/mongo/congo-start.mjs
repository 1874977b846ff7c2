// Starts one CongoDB (in-memory MongoDB wire-protocol server) on 127.0.0.1:$CONGO_PORT for the
// tests; install.sh copies this next to the unpacked package. Prints one "listening" line the
// tests wait for, and stops on SIGTERM/SIGINT (the tests kill it by PID).
import { CongoServer } from './package/dist_ts/congodb/index.js';
const port = Number(process.env.CONGO_PORT || 27017);
const server = new CongoServer({ port, host: '127.0.0.1', storage: 'memory' });
await server.start();
console.log(`congodb listening mongodb://127.0.0.1:${port}`);
const stop = () => { setTimeout(() => process.exit(0), 2000).unref();
                     server.stop().finally(() => process.exit(0)); };
process.on('SIGTERM', stop); process.on('SIGINT', stop);
