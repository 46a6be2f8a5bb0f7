// A webhook receiver written the way Elastic Path's (Moltin's) public examples read deliveries:
// moltin/examples order-confirmation-email (`JSON.parse(data.resources)`, then the order and its items)
// and sync-catalog-to-algolia (`resources.id` for a deleted resource, else `JSON.parse(resources)`).
// Like them it answers 500 when the body is not what it expects. Node's standard library only.
// It prints `{"port": N}` once listening, then one JSON line per delivery with what it read.
'use strict'
const http = require('http')

const secret = process.env.MOLTIN_WEBHOOK_SECRET || ''

function read (body) {
  const { triggered_by, resources } = body
  const [type, trigger] = triggered_by.split('.')
  if (trigger === 'deleted') {
    return { type, trigger, id: resources.id, resourceType: resources.type }
  }
  const resource = JSON.parse(resources)
  if (type === 'order') {
    const {
      data: {
        id,
        customer: { email },
        meta: { display_price: { with_tax: { formatted } } }
      },
      included: { items }
    } = resource
    return { type, trigger, id, email, total: formatted, items: items.map(item => item.id) }
  }
  const { data: { id: objectID, ...rest } } = resource
  return { type, trigger, id: objectID, name: rest.name }
}

const server = http.createServer((req, res) => {
  const chunks = []
  req.on('data', chunk => chunks.push(chunk))
  req.on('end', () => {
    if (req.headers['x-moltin-secret-key'] !== secret) {
      res.writeHead(401).end()
      return
    }
    let line
    try {
      const body = JSON.parse(Buffer.concat(chunks).toString('utf8'))
      line = { ok: true, event: body.id, read: read(body) }
      res.writeHead(200).end()
    } catch (error) {
      line = { ok: false, error: String(error) }
      res.writeHead(500).end(String(error))
    }
    process.stdout.write(JSON.stringify(line) + '\n')
  })
})

server.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: server.address().port }) + '\n')
})
