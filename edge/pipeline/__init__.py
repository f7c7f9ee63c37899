"""The pipeline: grabber, engine and publisher processes under one supervisor.

::

                 crops (ipc PUSH/PULL)          scores (ipc PUSH/PULL)
    grabber  ------------------------>  engine  ----------------------->  publisher --> ZeroMQ
       ^  header JSON + float32 bytes          header JSON + PNGs            |   alarm/ coverage/
       |                                                                     |   health/ + replay
       |   acknowledgements, resend          ctl (ipc ROUTER/DEALER)         |
       +------------------------------  supervisor  <------------------------+
                                    heartbeats, ready, fatal, eos, gaps, acks
                                    READY / WATCHDOG / STOPPING -> systemd

- :mod:`.supervisor`: starts the children with ``spawn``, relays acknowledgements, restarts
  what dies or stalls within limits, drains on SIGTERM, notifies systemd.
- :mod:`.grabber_process`, :mod:`.engine_process`, :mod:`.publisher_process`: the children.
- :mod:`.wire`: sockets and message frames (pixels as raw buffers, never pickled).
- :mod:`.settings`: typed settings; :mod:`.service`: ``edge run --config``;
  :mod:`.replay`: ``edge-replay``; :mod:`.report`: the summary and the report folder;
  :mod:`.notify`: the systemd notification sender; :mod:`.child`: what children share.

Lossless by acknowledgement: the grabber keeps every crop it sent until the publisher has
decided it (and spooled it, if an alarm). That window of unacknowledged crops is the bounded
queue of the whole pipeline: in replay a full window makes the grabber wait (backpressure), in
live mode a crop that does not fit is dropped, counted and reported as a coverage gap. After a
restart of the engine or the publisher the window is sent again; the publisher knows from its
spool which crops already raised an alarm, so a crop processed twice raises one alarm.
"""
