"""The HTTP layer: aiohttp application, routes, handlers, middleware, request and
response types, OpenAPI, the front door and the server runner. The only serving
package that imports aiohttp."""
