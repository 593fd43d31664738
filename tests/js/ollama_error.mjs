// One call through the ollama JavaScript client, as an app would make it, and
// what the app would show of the error it gets back. Run by
// tests/test_ollama_clients.py:
//
//     node tests/js/ollama_error.mjs <host> <call> [<task id>]
//
// <host> is the gateway's URL (else $OLLAMA_HOST); <call> is one of chat,
// chat-stream, pull, delete. Prints one JSON line:
//
//     {"status_code": 503, "message": "...", "error_type": "string", "name": "ResponseError"}
//
// "message" is err.message, the text an app prints; ollama-js builds it with
// `new ResponseError(body.error, status)` (its checkOk), so when body.error is
// an object and not a string, it reads "[object Object]".

import { Ollama } from 'ollama'

const [host = process.env.OLLAMA_HOST, call = 'chat', taskId] = process.argv.slice(2)
const client = new Ollama({ host, headers: taskId ? { 'X-Task-Id': taskId } : {} })
const messages = [{ role: 'user', content: 'hi' }]

const calls = {
  chat: () => client.chat({ model: 'llama3.2', messages }),
  'chat-stream': async () => {
    for await (const part of await client.chat({ model: 'llama3.2', messages, stream: true })) {
      void part
    }
  },
  pull: () => client.pull({ model: 'llama3.2' }),
  delete: () => client.delete({ model: 'llama3.2' }),
}

if (!host || !calls[call]) {
  console.error('usage: node ollama_error.mjs <host> <%s> [<task id>]', Object.keys(calls).join('|'))
  process.exit(2)
}

try {
  await calls[call]()
  console.log(JSON.stringify({ status_code: null, message: null, error_type: null, name: null }))
} catch (err) {
  console.log(JSON.stringify({
    status_code: err.status_code ?? null,
    message: err.message,
    error_type: typeof err.error,
    name: err.name,
  }))
}
