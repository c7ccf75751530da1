// A real OAuth 2.0 server for broker's login tests: npm `oidc-provider` 9.x on 127.0.0.1, a
// random port, plain HTTP (broker allows plain http to loopback only).
//
// Prints one line `listening http://127.0.0.1:PORT` on stdout once it accepts connections.
// Every request it receives, and every token endpoint outcome, is appended as one JSON line to
// $OAUTH_LOG, so a test can count what reached the server. Token values are never logged: a
// refresh token the server issues, and the token of each revocation request, are logged as a
// fingerprint (the first 16 hex digits of its SHA-256), so a test can tell which refresh
// token a revocation named without learning any.
//
// Environment:
//   OAUTH_LOG          the request log (required)
//   FIRST_TTL          access-token lifetime in seconds for tokens from a login (default 3600)
//   REFRESH_TTL        access-token lifetime for tokens from a refresh (default 3600)
//   TOKEN_DELAY_MS     delay before answering a refresh (widens race windows; default 0)
//
// Test-only controls (not OAuth):
//   GET /test/fail-token?on=1|0  answer every token request with invalid_grant while on
//   GET /test/hold-revocation?on=1|0
//                                while on, revocation requests are logged and then held (not
//                                answered) until it is turned off
//   GET /api/check               the resource server: 200 if `Authorization: Bearer <at>` is a
//                                live access (or client credentials) token, else 401

import { createHash } from 'node:crypto';
import { appendFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { join } from 'node:path';

// Resolve oidc-provider from NODE_PATH (the test clients' node_modules) or from here.
async function loadProvider() {
  const roots = [...(process.env.NODE_PATH || '').split(':').filter(Boolean), process.cwd()];
  for (const root of roots) {
    try {
      const req = createRequire(join(root, 'noop.js'));
      return (await import(req.resolve('oidc-provider'))).default;
    } catch { /* next */ }
  }
  return (await import('oidc-provider')).default;
}

const fingerprint = (token) => createHash('sha256').update(String(token)).digest('hex').slice(0, 16);
const log = (entry) => appendFileSync(process.env.OAUTH_LOG, `${JSON.stringify({ t: Date.now(), ...entry })}\n`);
const firstTtl = Number(process.env.FIRST_TTL || 3600);
const refreshTtl = Number(process.env.REFRESH_TTL || 3600);
const tokenDelay = Number(process.env.TOKEN_DELAY_MS || 0);

const Provider = await loadProvider();
const server = createServer();
await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
const { port } = server.address();
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: [
    {
      // A native public client (RFC 8252): PKCE, any loopback port.
      client_id: 'broker-test',
      application_type: 'native',
      token_endpoint_auth_method: 'none',
      redirect_uris: ['http://127.0.0.1/callback'],
      grant_types: ['authorization_code', 'refresh_token', 'urn:ietf:params:oauth:grant-type:device_code'],
      response_types: ['code'],
    },
    {
      // A confidential client for the client credentials grant.
      client_id: 'broker-service',
      client_secret: 'test-service-secret-0123456789',
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
    },
  ],
  scopes: ['openid', 'offline_access', 'api'],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    revocation: { enabled: true },
    clientCredentials: { enabled: true },
    userinfo: { enabled: true },
  },
  rotateRefreshToken: true,
  issueRefreshToken: async () => true,
  ttl: {
    AccessToken: (ctx, token) => ((token.gty || '').endsWith('refresh_token') ? refreshTtl : firstTtl),
    ClientCredentials: () => firstTtl,
    DeviceCode: 600,
    RefreshToken: 86400,
  },
  findAccount: async (ctx, id) => ({ accountId: id, claims: async () => ({ sub: id }) }),
  // Keep interaction cookies usable over plain http on 127.0.0.1.
  cookies: { keys: ['broker-test-cookie-key'] },
});
provider.proxy = false;

provider.on('grant.success', (ctx) => log({ event: 'token', grant_type: ctx.oidc.params.grant_type, ok: true }));
provider.on('grant.error', (ctx, err) => log({ event: 'token', grant_type: ctx.oidc?.params?.grant_type, ok: false, error: err.error }));
// The revocation endpoint emits only errors; what it revokes shows as destroyed tokens.
provider.on('revocation.error', (ctx, err) => log({ event: 'revocation_error', error: err.error }));
provider.on('access_token.destroyed', () => log({ event: 'destroyed', kind: 'access_token' }));
provider.on('refresh_token.destroyed', () => log({ event: 'destroyed', kind: 'refresh_token' }));
provider.on('grant.revoked', () => log({ event: 'grant_revoked' }));
// An opaque token's value is its jti.
provider.on('refresh_token.saved', (token) => log({ event: 'refresh_token_issued', fp: fingerprint(token.jti) }));
provider.on('server_error', (ctx, err) => log({ event: 'server_error', message: String(err && err.stack) }));

let failToken = false;
let holdRevocation = false;
let heldRevocations = [];

// The whole body of a request; oidc-provider then parses `req.body` (a string) instead.
async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString();
}
const callback = provider.callback();

async function liveAccessToken(header) {
  const m = /^Bearer (.+)$/.exec(header || '');
  if (!m) return false;
  const at = (await provider.AccessToken.find(m[1])) || (await provider.ClientCredentials.find(m[1]));
  return Boolean(at && !at.isExpired);
}

server.on('request', async (req, res) => {
  const url = new URL(req.url, issuer);
  log({ event: 'request', method: req.method, path: url.pathname });
  if (url.pathname === '/test/fail-token') {
    failToken = url.searchParams.get('on') === '1';
    res.end('ok');
    return;
  }
  if (url.pathname === '/test/hold-revocation') {
    holdRevocation = url.searchParams.get('on') === '1';
    if (!holdRevocation) {
      for (const release of heldRevocations) release();
      heldRevocations = [];
    }
    res.end('ok');
    return;
  }
  if (url.pathname === '/token/revocation' && req.method === 'POST') {
    req.body = await readBody(req);
    const form = new URLSearchParams(req.body);
    log({
      event: 'revocation_request',
      hint: form.get('token_type_hint'),
      fp: fingerprint(form.get('token')),
      held: holdRevocation,
    });
    if (holdRevocation) await new Promise((resolve) => heldRevocations.push(resolve));
  }
  if (url.pathname === '/api/check') {
    const ok = await liveAccessToken(req.headers.authorization);
    res.statusCode = ok ? 200 : 401;
    res.end(ok ? '{"ok":true}' : '{"ok":false}');
    return;
  }
  if (url.pathname === '/token' && req.method === 'POST') {
    if (failToken) {
      log({ event: 'token', grant_type: 'unknown', ok: false, error: 'invalid_grant (forced)' });
      res.statusCode = 400;
      res.setHeader('content-type', 'application/json');
      res.end('{"error":"invalid_grant","error_description":"grant request is invalid"}');
      return;
    }
    if (tokenDelay > 0) await new Promise((r) => setTimeout(r, tokenDelay));
  }
  callback(req, res);
});

process.stdout.write(`listening ${issuer}\n`);
