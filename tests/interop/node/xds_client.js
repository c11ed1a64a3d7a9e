// Stock grpc-js client balancing through the LB's xDS (@grpc/grpc-js-xds).
//
// The bootstrap (GRPC_XDS_BOOTSTRAP_CONFIG) names the LB as the xDS server;
// the channel dials xds:///<name>, so grpc-js asks the LB for the Listener,
// RouteConfiguration, Cluster and ClusterLoadAssignment and calls backends
// directly. Makes calls to helloworld.Greeter/SayHello and prints one JSON
// summary: calls per backend, failures (with the time they happened).
'use strict';

const args = { lb: '', name: 'greeter', nodeId: 'grpc-js-client', zone: '', calls: 300, duration: 0, interval: 0.02, readyTimeout: 20 };
for (let i = 2; i < process.argv.length; i += 2) {
  const key = process.argv[i].replace(/^--/, '').replace(/-(.)/g, (_, c) => c.toUpperCase());
  if (!(key in args)) throw new Error(`unknown flag ${process.argv[i]}`);
  args[key] = typeof args[key] === 'number' ? Number(process.argv[i + 1]) : process.argv[i + 1];
}
process.env.GRPC_XDS_BOOTSTRAP_CONFIG = JSON.stringify({
  xds_servers: [{ server_uri: args.lb, channel_creds: [{ type: 'insecure' }], server_features: ['xds_v3'] }],
  node: { id: args.nodeId, locality: { zone: args.zone } },
});

const grpc = require('@grpc/grpc-js');
require('@grpc/grpc-js-xds').register();

// helloworld's request and reply are both one string in field 1.
function encode(value) {
  const data = Buffer.from(value);
  const len = [];
  let n = data.length;
  do { let b = n & 0x7f; n >>= 7; len.push(n ? b | 0x80 : b); } while (n);
  return Buffer.concat([Buffer.from([0x0a, ...len]), data]);
}
function decode(raw) {
  if (!raw.length) return '';
  let i = 1, length = 0, shift = 0, b;
  do { b = raw[i++]; length |= (b & 0x7f) << shift; shift += 7; } while (b & 0x80);
  return raw.subarray(i, i + length).toString();
}

const Client = grpc.makeGenericClientConstructor({
  SayHello: {
    path: '/helloworld.Greeter/SayHello', requestStream: false, responseStream: false,
    requestSerialize: encode, requestDeserialize: decode, responseSerialize: encode, responseDeserialize: decode,
  },
});
const client = new Client(`xds:///${args.name}`, grpc.credentials.createInsecure());
const sleep = (s) => new Promise((r) => setTimeout(r, s * 1000));
const call = (name, timeout, waitForReady) => new Promise((resolve, reject) => {
  client.SayHello(name, { deadline: Date.now() + timeout * 1000, waitForReady }, (err, reply) => (err ? reject(err) : resolve(reply)));
});

(async () => {
  const deadline = Date.now() + args.readyTimeout * 1000;
  let lastError = null;
  for (;;) {
    try { await call('warmup', 2, true); break; } catch (e) {
      lastError = `${e.code}: ${e.details}`;
      if (Date.now() > deadline) { console.log(JSON.stringify({ error: `never became ready: ${lastError}` })); process.exit(1); }
      await sleep(0.2);
    }
  }
  const perBackend = {}, failures = [];
  let calls = 0;
  const end = Date.now() + args.duration * 1000;
  while (args.duration > 0 ? Date.now() < end : calls < args.calls) {
    if (args.duration > 0) await sleep(args.interval);
    calls += 1;
    try {
      const reply = await call(`call-${calls}`, 5, false);
      const backend = reply.split(' from ').pop();
      perBackend[backend] = (perBackend[backend] || 0) + 1;
    } catch (e) {
      failures.push(`${new Date().toISOString()} ${e.code}: ${e.details}`);
    }
  }
  console.log(JSON.stringify({ calls, per_backend: perBackend, failures, grpc_js: require('@grpc/grpc-js/package.json').version }));
  client.close();
  process.exit(0);
})();
