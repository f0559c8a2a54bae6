// Test helpers: real `dvai-node serve` processes from the repository's virtualenv.

import { spawn } from 'node:child_process'
import net from 'node:net'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { fileURLToPath } from 'node:url'

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..')
export const VENV_BIN = path.join(REPO, '.venv', 'bin')
export const DVAI_NODE = path.join(VENV_BIN, 'dvai-node')
export const PYTHON = path.join(VENV_BIN, 'python')

/** The SIMULATED engine: for tests about processes, not inference. */
export const SIMULATED = { engine: 'simulated', simulated_tok_per_s: 400 }

export function cleanEnv () {
  return Object.fromEntries(Object.entries(process.env).filter(([name]) => !name.startsWith('DVAI_')))
}

export function tempDir (prefix = 'dvai-ai-sdk-') {
  const dir = mkdtempSync(path.join(tmpdir(), prefix))
  return { dir, remove: () => rmSync(dir, { recursive: true, force: true }) }
}

/**
 * Run `dvai-node serve` with a TOML config; resolve once it prints `ready`.
 * @param {string} configText
 * @param {number} [timeoutMs]
 */
export function startNode (configText, timeoutMs = 120_000) {
  const { dir, remove } = tempDir('dvai-node-')
  const config = path.join(dir, 'node.toml')
  writeFileSync(config, configText)
  const child = spawn(DVAI_NODE, ['serve', '--state-dir', path.join(dir, 'state'), '--port', '0', '--config', config],
    { env: { ...cleanEnv(), PYTHONUNBUFFERED: '1' }, stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => { child.kill('SIGKILL'); reject(new Error(`node did not start:\n${output}`)) }, timeoutMs)
    let baseURL = null
    const onData = (/** @type {Buffer} */ data) => {
      output += data.toString()
      const match = output.match(/OpenAI base URL: (\S+)/)
      if (match) baseURL = match[1]
      if (baseURL && /^ready$/m.test(output)) {
        clearTimeout(timer)
        child.stdout.off('data', onData)
        child.stdout.resume()
        child.stderr.resume()
        resolve({
          baseURL,
          pid: child.pid,
          stop: async () => {
            if (child.exitCode === null) {
              const exited = new Promise((resolve) => child.once('exit', resolve))
              child.kill('SIGTERM')
              await exited
            }
            remove()
          }
        })
      }
    }
    child.stdout.on('data', onData)
    child.stderr.on('data', (data) => { output += data.toString() })
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`node exited (${code}):\n${output}`)) })
  })
}

/** Whether a process is alive (signal 0), zombies aside. */
export function pidAlive (pid) {
  try {
    process.kill(pid, 0)
  } catch {
    return false
  }
  try {
    const stat = readProcStat(pid)
    return stat === null || !['Z', 'X'].includes(stat)
  } catch {
    return true
  }
}

function readProcStat (pid) {
  const text = readFileSync(`/proc/${pid}/stat`, 'utf8')
  return text.slice(text.lastIndexOf(')') + 2).split(' ')[0]
}

/**
 * Nothing accepts connections on `port` any more. A killed serve's pid can look dead (its main
 * thread a zombie) a moment before its other threads are gone and its socket is closed.
 */
export function portRefuses (port, host = '127.0.0.1') {
  return new Promise((resolve) => {
    const socket = net.connect({ port, host })
    socket.once('connect', () => { socket.destroy(); resolve(false) })
    socket.once('error', (error) => resolve(error.code === 'ECONNREFUSED'))
  })
}

/** Poll `predicate` until it is true or `timeoutMs` passes. */
export async function waitUntil (predicate, timeoutMs, intervalMs = 50) {
  const deadline = Date.now() + timeoutMs
  while (Date.now() < deadline) {
    if (await predicate()) return true
    await new Promise((resolve) => setTimeout(resolve, intervalMs))
  }
  return Boolean(await predicate())
}

/**
 * A Python consumer process (tests/managed_support.py): resolves a managed serve and prints it.
 * @param {Record<string, unknown>} options managed_node() keyword arguments as JSON
 */
export function startPythonConsumer (options) {
  const child = spawn(PYTHON, ['-m', 'tests.managed_support', JSON.stringify(options)],
    { cwd: REPO, env: { ...cleanEnv(), PYTHONUNBUFFERED: '1' }, stdio: ['pipe', 'pipe', 'pipe'] })
  let buffer = ''
  let stderr = ''
  /** @type {((line: string) => void)[]} */
  const waiting = []
  const lines = []
  child.stdout.on('data', (data) => {
    buffer += data.toString()
    let index
    while ((index = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, index)
      buffer = buffer.slice(index + 1)
      const next = waiting.shift()
      if (next) next(line); else lines.push(line)
    }
  })
  child.stderr.on('data', (data) => { stderr += data.toString() })
  const read = (timeoutMs = 60_000) => new Promise((resolve, reject) => {
    if (lines.length > 0) return resolve(JSON.parse(lines.shift()))
    const timer = setTimeout(() => reject(new Error(`python consumer said nothing:\n${stderr}`)), timeoutMs)
    waiting.push((line) => { clearTimeout(timer); resolve(JSON.parse(line)) })
  })
  return {
    read,
    send: async (command) => { child.stdin.write(command + '\n'); return read() },
    stop: () => { if (child.exitCode === null) child.kill('SIGKILL') }
  }
}
