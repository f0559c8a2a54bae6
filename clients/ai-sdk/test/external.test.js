// External mode against real `dvai-node serve` processes.

import assert from 'node:assert/strict'
import { after, before, describe, test } from 'node:test'

import { embed, generateText, streamText } from 'ai'

import { createDvai, OFFLOAD_HEADER, offloadHeaders } from '../src/index.js'
import { SIMULATED, startNode } from './support.js'

describe('a real node (real engine, the built-in model)', () => {
  let node
  before(async () => { node = await startNode('[models.gemma3-270m]\nctx_size = 1024\n') })
  after(async () => { await node?.stop() })

  test('generateText', async () => {
    const dvai = createDvai({ baseURL: node.baseURL })
    const { text, usage, finishReason } = await generateText({
      model: dvai('gemma3-270m'), prompt: 'Say hello.', maxOutputTokens: 8, seed: 1
    })
    assert.ok(text.length > 0)
    assert.ok(usage.outputTokens > 0 && usage.outputTokens <= 8)
    assert.ok(['stop', 'length'].includes(finishReason))
  })

  test('streamText', async () => {
    const dvai = createDvai({ baseURL: node.baseURL })
    const result = streamText({ model: dvai.chatModel('gemma3-270m'), prompt: 'Count to three.', maxOutputTokens: 12 })
    const chunks = []
    for await (const chunk of result.textStream) chunks.push(chunk)
    assert.ok(chunks.length > 1, 'streamed in several chunks')
    assert.equal(chunks.join(''), await result.text)
    assert.ok((await result.usage).outputTokens > 0)
  })

  test('completion model', async () => {
    const dvai = createDvai({ baseURL: node.baseURL })
    const { text } = await generateText({ model: dvai.completionModel('gemma3-270m'), prompt: 'One, two,', maxOutputTokens: 4 })
    assert.ok(text.length > 0)
  })
})

describe('a SIMULATED node below the offload threshold, with no peers', () => {
  let node
  before(async () => {
    node = await startNode(`
[models.sim]
engine = "simulated"
simulated_tok_per_s = ${SIMULATED.simulated_tok_per_s}
[models.emb]
engine = "simulated"
embedding = true
[offload]
enabled = true
discover_lan = false
probe_on_start = false
min_local_capability = 1000000.0  # this device never qualifies: require must refuse
`)
  })
  after(async () => { await node?.stop() })

  test('X-DVAI-Offload per model and per call reaches the node', async () => {
    const sent = []
    const dvai = createDvai({
      baseURL: node.baseURL,
      fetch: (input, init) => { sent.push(new Headers(init?.headers).get(OFFLOAD_HEADER)); return fetch(input, init) }
    })
    const local = await generateText({ model: dvai('sim', { offload: 'never' }), prompt: 'x', maxOutputTokens: 3 })
    assert.ok(local.text.length > 0)
    // require: no peer qualifies, so the node answers 503 no_capable_device
    await assert.rejects(
      generateText({ model: dvai('sim'), prompt: 'x', maxOutputTokens: 3, headers: offloadHeaders('require'), maxRetries: 0 }),
      (error) => error.statusCode === 503 && /no_capable_device/.test(error.responseBody)
    )
    assert.deepEqual(sent, ['never', 'require'])
    assert.throws(() => dvai('sim', { offload: 'sometimes' }), TypeError)
    assert.throws(() => offloadHeaders('always'), TypeError)
  })

  test('embeddings', async () => {
    const dvai = createDvai({ baseURL: node.baseURL })
    const { embedding } = await embed({ model: dvai.embeddingModel('emb'), value: 'hello' })
    assert.equal(embedding.length, 8)
    const norm = Math.sqrt(embedding.reduce((sum, v) => sum + v * v, 0))
    assert.ok(Math.abs(norm - 1) < 1e-6)
  })
})
