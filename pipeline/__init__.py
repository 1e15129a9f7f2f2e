"""Restoration pipeline: storage, codecs, tiling, engine, Ray graph, manifest, training, CLI.

Data flows one way: plan -> storage.read -> codecs.decode -> engine (tiling) ->
codecs.encode -> storage.write -> manifest.
"""
