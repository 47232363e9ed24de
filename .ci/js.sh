#!/usr/bin/env bash
# The browser client's checks (js/, docs/js-client.md): the npm packages
# from the lock file (typescript, a dev dependency; only when missing or
# stale), the type check of the JSDoc-typed source, that the committed
# built files (js/switchboard.js, js/sync.js and their .d.ts) are what the
# source builds to, the served file's gzipped size against its 10 KiB
# budget, and the unit tests (node --test, fake timers). Node and npm come
# from .ci/install-browser.sh. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../js"

# node_modules/.ci-lock: the lock file of the last `npm ci`.
if ! cmp -s package-lock.json node_modules/.ci-lock 2>/dev/null; then
    echo "js: npm ci"
    npm ci --no-audit --no-fund
    cp package-lock.json node_modules/.ci-lock
fi
tsc=node_modules/.bin/tsc

echo "js: type check (tsc --checkJs), and the shipped types against test/types.ts"
"$tsc" -p tsconfig.json
"$tsc" -p tsconfig.test.json

echo "js: built files up to date"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$tsc" -p tsconfig.build.json --outDir "$out"
"$tsc" -p tsconfig.types.json --outDir "$out"
for f in switchboard.js switchboard.d.ts sync.js sync.d.ts; do
    if ! cmp -s "$f" "$out/$f"; then
        echo "js/$f is not what js/src/switchboard.js builds to: run \`npm run build\` in js/ and commit it" >&2
        exit 1
    fi
done

node -e '
const raw = require("fs").readFileSync("switchboard.js");
const gz = require("zlib").gzipSync(raw, { level: 9 }).length;
console.log(`js: served file js/switchboard.js: ${raw.length} bytes, ${gz} bytes gzipped (budget 10240)`);
if (gz > 10240) { console.error("js: over the 10 KiB gzipped budget"); process.exit(1); }
const sync = require("fs").readFileSync("sync.js");
const sgz = require("zlib").gzipSync(sync, { level: 9 }).length;
console.log(`js: served file js/sync.js: ${sync.length} bytes, ${sgz} bytes gzipped (budget 4096)`);
if (sgz > 4096) { console.error("js: sync.js over its 4 KiB gzipped budget"); process.exit(1); }
'

echo "js: unit tests"
node --test --test-reporter=spec test/*.test.mjs
