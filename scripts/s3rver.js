// The embedded broker's durable storage: s3rver (a file-backed S3 server) on 127.0.0.1, run by
// services/infra.py. Usage: node scripts/s3rver.js <data dir> <address> <port> <bucket>, with the
// credentials as one JSON line on stdin ({"id": ..., "secret": ...}): never argv, never env.
//
// Stock s3rver knows one hard-coded key pair (S3RVER/S3RVER) and serves unsigned requests to
// anyone. Here the stock pair is revoked, the generated one is the only one, and a request
// without a signature is refused before s3rver sees it: another local user can connect to the
// port but can neither read nor write the broker's log.
//
// Stock s3rver also ignores If-Match / If-None-Match on PUT and writes objects in place (a GET
// during a PUT reads a part-written file). Tansu's s3:// engine keeps its metadata (producer
// ids, watermarks, group offsets) in objects it updates read-modify-write, relying on those
// conditional PUTs: two concurrent updates then both "succeed" and one is lost. Seen here as
// a producer id the broker forgot (UnknownProducerId forever) when one process's two producers
// registered at once. So every request on one object runs alone (a lock per key, the body
// read in full inside it), and conditional PUTs are checked under that lock: 412 when the
// precondition fails, as S3 does.
'use strict';

const path = require('path');
const modules = process.env.APMAE_S3RVER_MODULES;
const S3rver = require(modules ? path.join(modules, 's3rver') : 's3rver');
const AWSAccount = require(modules ? path.join(modules, 's3rver/lib/models/account') : 's3rver/lib/models/account');

const [directory, address, port, bucket] = process.argv.slice(2);

const locks = new Map(); // "/bucket/key" -> the tail of that object's queue of requests

async function exclusively(key, work) {
  const before = locks.get(key) || Promise.resolve();
  let release;
  const mine = new Promise(resolve => { release = resolve; });
  const tail = before.then(() => mine);
  locks.set(key, tail);
  await before;
  try {
    return await work();
  } finally {
    release();
    if (locks.get(key) === tail) locks.delete(key);
  }
}

function preconditionFailed(ctx) {
  ctx.status = 412;
  ctx.type = 'application/xml';
  ctx.body = '<?xml version="1.0" encoding="UTF-8"?><Error><Code>PreconditionFailed</Code>'
    + '<Message>At least one of the pre-conditions you specified did not hold</Message></Error>';
}

const bare = etag => String(etag).replace(/^W\//, '').replace(/"/g, '');

function objectAtATime(store) {
  return async (ctx, next) => {
    const parts = ctx.path.split('/');
    if (parts.length < 3 || parts[2] === '') return next(); // bucket-level: listings
    const bkt = decodeURIComponent(parts[1]);
    const key = decodeURIComponent(parts.slice(2).join('/'));
    return exclusively(`/${bkt}/${key}`, async () => {
      if (ctx.method === 'PUT') {
        const noneMatch = ctx.headers['if-none-match'];
        const match = ctx.headers['if-match'];
        if (noneMatch !== undefined || match !== undefined) {
          const exists = await store.existsObject(bkt, key);
          if (noneMatch === '*' && exists) return preconditionFailed(ctx);
          if (match !== undefined) {
            if (!exists) return preconditionFailed(ctx);
            const { etag } = await store.getMetadata(bkt, key);
            if (match !== '*' && bare(match) !== bare(etag)) return preconditionFailed(ctx);
          }
        }
      }
      await next();
      if (ctx.body && typeof ctx.body.pipe === 'function') { // read it before the next writer may
        const chunks = [];
        for await (const chunk of ctx.body) chunks.push(chunk);
        ctx.body = Buffer.concat(chunks);
      }
    });
  };
}
let input = '';
process.stdin.on('data', chunk => { input += chunk; });
process.stdin.on('end', () => {
  const { id, secret } = JSON.parse(input);
  AWSAccount.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
  AWSAccount.DUMMY_ACCOUNT.createKeyPair(id, secret);
  const server = new S3rver({
    directory, address, port: Number(port), silent: true, configureBuckets: [{ name: bucket, configs: [] }],
  });
  server.middleware.unshift(objectAtATime(server.store));
  server.middleware.unshift(async (ctx, next) => {
    const signed = 'authorization' in ctx.headers || 'Signature' in ctx.query || 'X-Amz-Algorithm' in ctx.query;
    if (!signed) {
      ctx.status = 403;
      ctx.body = 'unsigned requests are refused';
      return;
    }
    await next();
  });
  server.run((err, host) => {
    if (err) { console.error(err); process.exit(1); }
    console.log(`s3rver listening on ${host.address}:${host.port}, data in ${directory}`);
  });
  const stop = () => server.close(() => process.exit(0));
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
});
