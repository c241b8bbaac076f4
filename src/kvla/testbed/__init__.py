"""The testbed: MetaWorld tasks rendered offscreen, scripted-expert demonstrations, behaviour
cloning of the reference VLA, and closed-loop evaluation paired across methods by seed."""
