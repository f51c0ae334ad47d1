# The board's entry point: config.json -> sensor, Wi-Fi, Board.run() forever.
import json

import tern_board
import tern_sensors


def main(path="config.json"):
    with open(path) as f:
        config = json.load(f)
    sensor = tern_sensors.make_sensor(config["sensor"])
    board = tern_board.Board(config, sensor, radio=tern_board.WifiRadio())
    board.run()


main()
