"""`onnxgen web`: an export running in the browser (transformers.js on onnxruntime-web, WASM or WebGPU).

server.py serves three things and nothing else of the filesystem: the page (static/), the JavaScript
runtime installed by npm into node_modules/ here (package.json, package-lock.json), and one export folder.
"""
