"""WebSocket echo server or client (python3-websockets) for the HTTP
layer's upgrade test.

usage: ws.py serve ADDR PORT | ws.py call URL MESSAGE
"""
import asyncio
import sys

import websockets


async def echo(ws, *_):
    async for message in ws:
        await ws.send("echo:" + message)


async def main():
    if sys.argv[1] == "serve":
        async with websockets.serve(echo, sys.argv[2], int(sys.argv[3])):
            await asyncio.Future()
    else:
        async with websockets.connect(sys.argv[2], open_timeout=10) as ws:
            for i in range(3):
                await ws.send(f"{sys.argv[3]}{i}")
                print(await asyncio.wait_for(ws.recv(), 10))


asyncio.run(main())
