// Managed mode: real `dvai-node managed attach` runs, real serves (SIMULATED engine: these tests
// are about spawning, sharing and reaping), and a Python consumer sharing the same serve.

import assert from 'node:assert/strict'
import { readdirSync } from 'node:fs'
import path from 'node:path'
import { after, test } from 'node:test'

import { generateText } from 'ai'

import {
  BinaryNotFoundError,
  createDvai,
  DuplicateManagedModelError,
  DvaiManagedErrorCode,
  DvaiManagedModeError,
  MultipleDefaultManagedModelsError,
  ServeExitedError,
  UnknownManagedModelError
} from '../src/index.js'
import { DVAI_NODE, SIMULATED, pidAlive, portRefuses, startPythonConsumer, tempDir, waitUntil } from './support.js'

const registry = tempDir('dvai-registry-')
const opened = []
const records = () => readdirSync(registry.dir).filter((name) => name.endsWith('.json'))

after(async () => {
  for (const provider of opened) await provider.close()
  // serves left idle are reaped by their supervisors; make sure none outlives the tests
  await waitUntil(() => records().length === 0, 15_000)
  registry.remove()
})

/** @param {Record<string, unknown>} config @param {Record<string, unknown>} [extra] */
async function managed (config = {}, extra = {}) {
  const provider = await createDvai({
    mode: 'managed',
    models: [{ name: 'GEMMA3_270M', config: { ...SIMULATED, ...config } }],
    serveBinPath: DVAI_NODE,
    registryDir: registry.dir,
    serveIdleTimeout: 500,
    ...extra
  })
  opened.push(provider)
  return provider
}

test('spawns a node, serves generateText, and shares it with a Python consumer (one pid)', async () => {
  const dvai = await managed()
  assert.ok(dvai.spawned && pidAlive(dvai.pid))
  assert.match(dvai.baseURL, /^http:\/\/127\.0\.0\.1:\d+\/v1$/)
  const { text } = await generateText({ model: dvai('GEMMA3_270M'), prompt: 'hi', maxOutputTokens: 3 })
  assert.ok(text.length > 0)

  const python = startPythonConsumer({
    models: [{ name: 'GEMMA3_270M', config: SIMULATED }],
    registry_dir: registry.dir,
    idle_timeout: 0.5
  })
  try {
    const seen = await python.read()
    assert.equal(seen.pid, dvai.pid)
    assert.equal(seen.spawned, false)
    assert.equal((await python.send('chat')).pid, dvai.pid)
    assert.deepEqual(await python.send('close'), { closed: true })
  } finally {
    python.stop()
  }
  assert.ok(pidAlive(dvai.pid), 'the Python consumer leaving did not stop the JS consumer\'s node')
  await dvai.close()
})

test('close() detaches: the node lives while another consumer uses it, then is reaped', async () => {
  const first = await managed({ ctx_size: 2048 })
  const second = await managed({ ctx_size: 2048 })
  assert.equal(second.pid, first.pid)
  assert.equal(second.spawned, false)
  await first.close()
  await first.close() // idempotent
  assert.equal(first.closed, true)
  const { text } = await generateText({ model: second('gemma3-270m'), prompt: 'x', maxOutputTokens: 2 })
  assert.ok(text.length > 0 && pidAlive(second.pid))
  const pid = second.pid
  assert.equal(typeof Symbol.asyncDispose, 'symbol')
  await second[Symbol.asyncDispose]() // what `await using` calls at the end of its scope
  assert.ok(await waitUntil(() => !pidAlive(pid), 15_000), 'reaped after the idle timeout')
})

test('a node killed under a consumer is respawned and the refused request retried once', async () => {
  const dvai = await managed({ ctx_size: 1024 })
  const before = dvai.pid
  process.kill(before, 'SIGKILL')
  assert.ok(await waitUntil(async () => !pidAlive(before) && await portRefuses(dvai.port), 10_000))
  const { text } = await generateText({ model: dvai('gemma3-270m'), prompt: 'x', maxOutputTokens: 2, maxRetries: 0 })
  assert.ok(text.length > 0)
  assert.notEqual(dvai.pid, before)
  assert.ok(pidAlive(dvai.pid))
  await dvai.close()
})

test('typed errors with codes', async () => {
  await assert.rejects(managed({}, { models: ['NO_SUCH_MODEL'] }), (error) =>
    error instanceof UnknownManagedModelError && error instanceof DvaiManagedModeError &&
    error.code === DvaiManagedErrorCode.UNKNOWN_MODEL)
  await assert.rejects(managed({}, { models: ['GEMMA3_270M', 'gemma3-270m'] }), (error) =>
    error instanceof DuplicateManagedModelError && error.code === 'duplicate_model')
  await assert.rejects(managed({}, {
    models: [{ name: 'GEMMA3_270M', alias: 'a', default: true }, { name: 'GEMMA3_270M', alias: 'b', default: true }]
  }), (error) => error instanceof MultipleDefaultManagedModelsError && error.code === 'multiple_default_models')
  await assert.rejects(managed({}, { serveBinPath: path.join(registry.dir, 'missing', 'dvai-node') }), (error) =>
    error instanceof BinaryNotFoundError && error.code === 'binary_not_found')
  await assert.rejects(managed({ ctx_size: 0 }), (error) =>
    error instanceof ServeExitedError && error.code === 'serve_exited' && /ctx_size/.test(error.message))
})
