"""The async drivers: a node and its collaborators, one mechanism per module (coordinator in node, hinted handoff,
read repair, anti-entropy, tombstone reaper, the CASPaxos register), assembled by ``assembly.assemble_node``
over the Transport, Storage and Clock seams.
"""
