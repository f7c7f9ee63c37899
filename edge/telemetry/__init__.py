"""Where on the line each recorded line was captured: run.json, NMEA and CSV telemetry, GPS
interpolation, dead reckoning through tunnels and mileage.

- :mod:`edge.telemetry.run`: ``run.json`` (:class:`RunInfo`) and the sidecar file names.
- :mod:`edge.telemetry.nmea`: strict NMEA 0183 reading (RMC, GGA, VTG, ZDA) and writing.
- :mod:`edge.telemetry.csvlog`: ``run.telemetry.csv`` (time, encoder count, lat, lon, speed).
- :mod:`edge.telemetry.simulate`: a plausible GPS track for recordings made from stills.
- :mod:`edge.telemetry.position`: :class:`Positioner`, line index -> time, GPS and mileage.
"""
