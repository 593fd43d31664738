// N chats at once through the ollama JavaScript client, as an app that
// fires them with Promise.all would. Run by tests/test_drop_in.py:
//
//     node tests/js/ollama_concurrent.mjs <host> <n> [<X-Stub knobs>]
//
// Prints one JSON line: {"answered": <how many chats answered>, "errors": ["<message>", ...]}.
// Promise.allSettled keeps every outcome: one refusal must not hide the others.

import { Ollama } from 'ollama'

const [host, n = '8', knobs = ''] = process.argv.slice(2)
const client = new Ollama({ host, headers: knobs ? { 'X-Stub': knobs } : {} })
const messages = [{ role: 'user', content: 'hi' }]

const outcomes = await Promise.allSettled(
  Array.from({ length: Number(n) }, () => client.chat({ model: 'llama3.2', messages })))
console.log(JSON.stringify({
  answered: outcomes.filter((o) => o.status === 'fulfilled' && o.value.message.content).length,
  errors: outcomes.filter((o) => o.status === 'rejected').map((o) => String(o.reason.message)),
}))
