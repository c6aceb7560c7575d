"""The ingest stage, pure Python: parse VisDial (``visdial``, ``options``), check images
(``images``), clean and write the tables (``clean``, ``write``), and the demo data (``demo_data``)."""
