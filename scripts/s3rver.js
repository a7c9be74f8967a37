// The embedded broker's durable storage: s3rver (a file-backed S3 server) on 127.0.0.1, run by
// services/infra.py. Usage: node scripts/s3rver.js <data dir> <address> <port> <bucket>, with the
// credentials as one JSON line on stdin ({"id": ..., "secret": ...}): never argv, never env.
//
// Stock s3rver knows one hard-coded key pair (S3RVER/S3RVER) and serves unsigned requests to
// anyone. Here the stock pair is revoked, the generated one is the only one, and a request
// without a signature is refused before s3rver sees it: another local user can connect to the
// port but can neither read nor write the broker's log.
'use strict';

const path = require('path');
const modules = process.env.APMAE_S3RVER_MODULES;
const S3rver = require(modules ? path.join(modules, 's3rver') : 's3rver');
const AWSAccount = require(modules ? path.join(modules, 's3rver/lib/models/account') : 's3rver/lib/models/account');

const [directory, address, port, bucket] = process.argv.slice(2);
let input = '';
process.stdin.on('data', chunk => { input += chunk; });
process.stdin.on('end', () => {
  const { id, secret } = JSON.parse(input);
  AWSAccount.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
  AWSAccount.DUMMY_ACCOUNT.createKeyPair(id, secret);
  const server = new S3rver({
    directory, address, port: Number(port), silent: true, configureBuckets: [{ name: bucket, configs: [] }],
  });
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
